#!/usr/bin/env python3
"""Generate llama.cpp reference outputs for folio's parity tests.

Run with the python of the venv made by tools/llamacpp_env.sh:

    PY=$(tools/llamacpp_env.sh)
    $PY tools/gen_references.py                      # greedy + logits fixtures
    $PY tools/gen_references.py --mode greedy        # only reference_greedy.json
    $PY tools/gen_references.py --mode logits        # only reference_logits.json
    $PY tools/gen_references.py --kv-type q8_0       # quantized KV cache (and q4_0):
                                                     # reference_{greedy,logits}_kv_q8_0.json

Everything goes through the llama.cpp low-level C API (llama_cpp.llama_cpp),
not the high-level Llama class: in llama-cpp-python 0.3.x `Llama.scores`
stays zero unless logits_all=True, and the high-level sampler path is not
what we want to pin.  Generation is greedy: one batched prompt decode (logits
only for the last prompt position), then one token per llama_decode, taking
the argmax of llama_get_logits_ith(ctx, -1) with the lowest id winning ties.

Settings pinned: CPU only, n_threads = n_threads_batch = 2, n_ctx 2048,
llama.cpp default n_batch/n_ubatch, flash_attn off, f16 KV cache, seed 1234
(unused by greedy decoding but recorded). With --kv-type q8_0|q4_0, K and V are
cached in that type (llama.cpp's -ctk/-ctv), which needs flash_attn on; the
files are then named reference_greedy_kv_<type>.json and
reference_logits_kv_<type>.json.

Outputs (in tests/fixtures/ by default):
  reference_greedy.json  per prompt: rendered text, prompt token ids, 64
                         greedy tokens, per-step top-1/top-2 ids and margin
                         (top-1 logit - top-2 logit), finish reason.
  reference_logits.json  top-50 (id, logit) of the last-position logits for the
                         first 3 steps of 2 prompts (4 decimals).
"""
import argparse
import ctypes
import hashlib
import json
import os
import sys

import numpy as np

try:
    import llama_cpp
    from llama_cpp import llama_cpp as L
except ImportError:  # pragma: no cover
    sys.exit("gen_references.py: llama_cpp not importable; run with the python "
             "printed by tools/llamacpp_env.sh")

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
FIXTURES = os.path.join(REPO, "tests", "fixtures")

N_PREDICT = 64
N_CTX = 2048
N_THREADS = 2
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llamacpp_util import quiet_llama_logs  # noqa: E402

SEED = 1234
LOGITS_PROMPTS = ("fact_capital", "chat_capital")
LOGITS_STEPS = 3
LOGITS_TOPK = 50



def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Model:
    def __init__(self, path, use_extra_bufts=True, kv_type="f16"):
        quiet_llama_logs()
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_mmap = True
        # False: no repacked or AMX weight buffers (their kernels sum in orders of their own)
        mp.use_extra_bufts = use_extra_bufts
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"failed to load model {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)

        cp = L.llama_context_default_params()
        cp.n_ctx = N_CTX
        cp.n_threads = N_THREADS
        cp.n_threads_batch = N_THREADS
        cp.n_seq_max = 1
        ggml_type = {"f16": L.GGML_TYPE_F16, "q8_0": L.GGML_TYPE_Q8_0, "q4_0": L.GGML_TYPE_Q4_0}[kv_type]
        flash = kv_type != "f16"  # llama.cpp quantizes the V cache only with flash attention
        cp.flash_attn = flash
        cp.type_k = ggml_type
        cp.type_v = ggml_type
        cp.no_perf = True
        self.ctx_params = {"n_ctx": cp.n_ctx, "n_batch": cp.n_batch,
                           "n_ubatch": cp.n_ubatch, "n_threads": N_THREADS,
                           "flash_attn": flash, "type_k": kv_type,
                           "type_v": kv_type, "seed": SEED}
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("failed to create llama context")
        self.n_batch = cp.n_batch
        self.batch = L.llama_batch_init(max(cp.n_batch, 1), 0, 1)

    # -- metadata -----------------------------------------------------------
    def meta(self, key):
        buf = ctypes.create_string_buffer(1 << 17)
        n = L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        return buf.value.decode("utf-8")

    def add_bos(self):
        v = self.meta("tokenizer.ggml.add_bos_token")
        if v is None:
            return bool(L.llama_vocab_get_add_bos(self.vocab))
        return v.strip().lower() == "true"

    def token_piece(self, tok):
        buf = ctypes.create_string_buffer(256)
        n = L.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)]

    def detok(self, toks):
        return b"".join(self.token_piece(t) for t in toks).decode("utf-8", errors="replace")

    def special_token_text(self, tid):
        if tid is None or tid < 0:
            return ""
        return self.token_piece(tid).decode("utf-8", errors="replace")

    # -- tokenizer ------------------------------------------------------------
    def tokenize(self, text, add_bos, special):
        data = text.encode("utf-8")
        cap = len(data) + 16
        arr = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), arr, cap, add_bos, special)
        if n < 0:
            cap = -n
            arr = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), arr, cap, add_bos, special)
        if n < 0:
            raise RuntimeError("tokenization failed")
        return list(arr[:n])

    # -- decoding -------------------------------------------------------------
    def clear(self):
        mem = L.llama_get_memory(self.ctx)
        L.llama_memory_clear(mem, True)

    def _decode(self, toks, pos0):
        """Decode toks at positions pos0.. in seq 0; logits only for the last."""
        b = self.batch
        for start in range(0, len(toks), self.n_batch):
            chunk = toks[start:start + self.n_batch]
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = pos0 + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = 0
            last = start + len(chunk) == len(toks)
            if last:
                b.logits[len(chunk) - 1] = 1
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed: {rc}")

    def last_logits(self):
        p = L.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,)).astype(np.float32, copy=True)

    def greedy(self, prompt_tokens, n_predict, keep_logits_steps=0):
        self.clear()
        if len(prompt_tokens) + n_predict > N_CTX:
            raise RuntimeError("prompt too long")
        self._decode(prompt_tokens, 0)
        pos = len(prompt_tokens)
        toks, margins, top2, kept = [], [], [], []
        finish = "length"
        for step in range(n_predict):
            lg = self.last_logits()
            if step < keep_logits_steps:
                kept.append(lg)
            # argmax with lowest id on ties (np.argmax returns first max)
            t1 = int(np.argmax(lg))
            v1 = lg[t1]
            lg2 = lg.copy()
            lg2[t1] = -np.inf
            t2 = int(np.argmax(lg2))
            margins.append(float(v1 - lg2[t2]))
            top2.append(t2)
            toks.append(t1)
            if L.llama_vocab_is_eog(self.vocab, t1):
                finish = "stop"
                break
            if step + 1 == n_predict:
                break
            self._decode([t1], pos)
            pos += 1
        return toks, top2, margins, finish, kept


def render_chat(template, messages, bos_token, eos_token):
    """Render like llama-cpp-python's Jinja2ChatFormatter / HF apply_chat_template."""
    def raise_exception(msg):
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(),
                                        trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, bos_token=bos_token, eos_token=eos_token,
        raise_exception=raise_exception, add_generation_prompt=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", default=os.path.join(FIXTURES, "prompts.json"))
    ap.add_argument("--out-dir", default=FIXTURES)
    ap.add_argument("--mode", choices=("all", "greedy", "logits"), default="all")
    ap.add_argument("--n-predict", type=int, default=N_PREDICT)
    ap.add_argument("--kv-type", choices=("f16", "q8_0", "q4_0"), default="f16")
    args = ap.parse_args()
    suffix = "" if args.kv_type == "f16" else f"_kv_{args.kv_type}"

    if not os.path.exists(args.model):
        sys.exit(f"gen_references.py: model not found: {args.model}")
    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)["prompts"]

    # Without the repacked/AMX weight buffers, as the committed fixtures were made: their kernels sum
    # in orders of their own, and folio reproduces ggml's plain CPU kernels.
    m = Model(args.model, use_extra_bufts=False, kv_type=args.kv_type)
    add_bos = m.add_bos()
    template = m.meta("tokenizer.chat_template")
    bos_text = m.special_token_text(L.llama_vocab_bos(m.vocab))
    eos_text = m.special_token_text(L.llama_vocab_eos(m.vocab))
    model_sha = sha256_file(args.model)

    cases = []
    logits_cases = []
    print(f"{'case':28s} {'ptok':>5s} {'gen':>4s} finish  m<0.05 m<0.2  min_margin")
    for p in prompts:
        kind = p["kind"]
        if kind == "raw":
            text = p["text"]
            ptoks = m.tokenize(text, add_bos, special=False)
        elif kind == "chat":
            if not template:
                sys.exit("model has no tokenizer.chat_template")
            text = render_chat(template, p["messages"], bos_text, eos_text)
            ptoks = m.tokenize(text, add_bos, special=True)
        else:
            sys.exit(f"unknown prompt kind {kind!r}")
        keep = LOGITS_STEPS if p["name"] in LOGITS_PROMPTS else 0
        if args.mode == "logits" and not keep:
            continue
        toks, top2, margins, finish, kept = m.greedy(ptoks, args.n_predict, keep)
        case = {"name": p["name"], "kind": kind, "text": text}
        if kind == "chat":
            case["messages"] = p["messages"]
        case.update({"prompt_tokens": ptoks, "tokens": toks, "top2": top2,
                     "margins": [round(x, 5) for x in margins],
                     "finish_reason": finish,
                     "completion_text": m.detok(toks)})
        cases.append(case)
        n005 = sum(1 for x in margins if x < 0.05)
        n02 = sum(1 for x in margins if x < 0.2)
        print(f"{p['name']:28s} {len(ptoks):5d} {len(toks):4d} {finish:6s} "
              f"{n005:6d} {n02:5d}  {min(margins):.4f}")
        if keep:
            steps = []
            for i, lg in enumerate(kept):
                order = np.argsort(-lg, kind="stable")[:LOGITS_TOPK]
                steps.append({"step": i,
                              "context_tokens": ptoks + toks[:i],
                              "top_ids": [int(t) for t in order],
                              "top_logits": [round(float(lg[t]), 4) for t in order]})
            logits_cases.append({"name": p["name"], "kind": kind, "text": text,
                                 "prompt_tokens": ptoks, "steps": steps})

    common = {"model_sha256": model_sha,
              "model_file": os.path.basename(args.model),
              "generator": f"llama-cpp-python {llama_cpp.__version__}",
              "settings": dict(m.ctx_params, add_bos=add_bos, device="cpu")}
    if args.mode in ("all", "greedy"):
        out = dict(common)
        out.update({"n_predict": args.n_predict,
                    "notes": "tokens: greedy continuation (argmax, lowest id on ties); "
                             "top2: runner-up id per step; margins: top-1 minus top-2 logit "
                             "per step; finish_reason 'stop' = last token is end-of-generation "
                             "(included in tokens), 'length' = n_predict tokens.",
                    "cases": cases})
        path = os.path.join(args.out_dir, f"reference_greedy{suffix}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(out, f, ensure_ascii=False, indent=1)
            f.write("\n")
        all_m = [x for c in cases for x in c["margins"]]
        print(f"wrote {path}: {len(cases)} cases, {len(all_m)} steps, "
              f"{sum(x < 0.05 for x in all_m)} with margin<0.05, "
              f"{sum(x < 0.2 for x in all_m)} with margin<0.2")
    if args.mode in ("all", "logits"):
        out = dict(common)
        out.update({"n_steps": LOGITS_STEPS, "top_k": LOGITS_TOPK,
                    "notes": "Last-position logits at the first steps of greedy decoding: "
                             "step i is the distribution after prompt_tokens + the first i "
                             "generated tokens (context_tokens). Top-k ids by logit, values "
                             "rounded to 4 decimals.",
                    "cases": logits_cases})
        path = os.path.join(args.out_dir, f"reference_logits{suffix}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(out, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print(f"wrote {path}: {len(logits_cases)} cases")

    L.llama_batch_free(m.batch)
    L.llama_free(m.ctx)
    L.llama_model_free(m.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
