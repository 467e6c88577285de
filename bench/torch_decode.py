#!/usr/bin/env python3
"""PyTorch side of folio's side-by-side GPU benchmark: plain transformers eager decode.

Builds a random-weight Llama (transformers LlamaConfig + LlamaForCausalLM, nothing downloaded)
straight on the GPU in bf16/fp16: constructed under torch.device("cuda") with the default dtype
set and torch/transformers weight init skipped (no_init_weights), then filled on the GPU with
normal(0, 0.02) (norm weights 1), so even the Llama-3-8B shape is built in seconds.

Measured the way a plain transformers decode loop runs (attn_implementation="sdpa", no
torch.compile, no CUDA graphs): model(ids, past_key_values=DynamicCache, use_cache=True,
logits_to_keep=1), greedy argmax on the last logits, one token per sequence fed back per step.
  prefill  one prompt of --prompt-tokens pseudo-random ids (fixed seed) in one forward pass into
           a fresh cache; torch.cuda.synchronize() around it; prefill_tok_s = tokens / seconds.
  decode   for each B in --batches: B prompts of 16 random ids, prefilled in one forward (not
           timed), then --decode-tokens steps of B tokens (one per sequence) are timed, so only
           steps that carry no prompt tokens count; tok_s = B * steps / seconds.
Like `folio-bench engine`, each figure is the best of --repeat runs after one warm-up run.
A batch that runs out of GPU memory is reported as skipped (with the error) and the rest go on.
peak_mem_gib is torch.cuda.max_memory_allocated() over the whole run (weights + caches).
Human-readable lines are printed while running; the last stdout line is one JSON object.

usage: torch_decode.py [-h] [--preset {llama3-8b,smollm2-135m}] [--layers N] [--dim N] [--ff N]
                       [--heads N] [--kv-heads N] [--vocab N] [--ctx N] [--rope-theta X] [--tied]
                       [--dtype {bf16,fp16}] [--prompt-tokens N] [--decode-tokens N]
                       [--batches LIST] [--repeat N] [--seed N] [--json FILE]
"""
import argparse
import contextlib
import gc
import json
import time

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

try:  # transformers 5.x
    from transformers.initialization import no_init_weights
except ImportError:
    try:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext

PRESETS = {
    "llama3-8b": dict(layers=32, dim=4096, ff=14336, heads=32, kv_heads=8, vocab=128256,
                      rope_theta=500000.0, tied=False),
    "smollm2-135m": dict(layers=30, dim=576, ff=1536, heads=9, kv_heads=3, vocab=49152,
                         rope_theta=100000.0, tied=True),
}
SEQ_PROMPT = 16  # tokens per sequence prompt in the decode test


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS))
    for f in ("layers", "dim", "ff", "heads", "kv-heads", "vocab"):
        p.add_argument("--" + f, type=int, metavar="N", help="overrides the preset")
    p.add_argument("--ctx", type=int, default=4096, metavar="N", help="max positions (4096)")
    p.add_argument("--rope-theta", type=float, metavar="X", help="500000 or the preset's")
    p.add_argument("--tied", action="store_true", default=None, help="tie embeddings and lm_head")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--prompt-tokens", type=int, default=512, metavar="N", help="prefill (512)")
    p.add_argument("--decode-tokens", type=int, default=64, metavar="N", help="timed steps (64)")
    p.add_argument("--batches", default="1,8,64,256", metavar="LIST", help="(1,8,64,256)")
    p.add_argument("--repeat", type=int, default=3, metavar="N", help="timed runs (3)")
    p.add_argument("--seed", type=int, default=1234, metavar="N")
    p.add_argument("--json", metavar="FILE", help="also write the JSON result here")
    a = p.parse_args()
    shape = dict(PRESETS[a.preset]) if a.preset else dict(rope_theta=500000.0, tied=False)
    for k in ("layers", "dim", "ff", "heads", "kv_heads", "vocab", "rope_theta", "tied"):
        if getattr(a, k) is not None:
            shape[k] = getattr(a, k)
    shape.setdefault("kv_heads", shape.get("heads"))
    missing = [k for k in ("layers", "dim", "ff", "heads", "vocab") if shape.get(k) is None]
    if missing:
        p.error("give --preset or all of: " + ", ".join("--" + k for k in missing))
    shape["ctx"] = a.ctx
    a.batch_list = [int(b) for b in a.batches.split(",") if b.strip()]
    if a.prompt_tokens > a.ctx or SEQ_PROMPT + a.decode_tokens > a.ctx:
        p.error("--ctx too small for --prompt-tokens / 16 + --decode-tokens")
    return a, shape


def build_model(s, dtype):
    kw = dict(vocab_size=s["vocab"], hidden_size=s["dim"], intermediate_size=s["ff"],
              num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
              num_key_value_heads=s["kv_heads"], max_position_embeddings=s["ctx"],
              tie_word_embeddings=s["tied"])
    try:
        cfg = LlamaConfig(**kw, attn_implementation="sdpa")
    except (TypeError, ValueError):
        cfg = LlamaConfig(**kw)
        cfg._attn_implementation = "sdpa"
    if hasattr(cfg, "rope_parameters"):  # transformers 5
        rp = cfg.rope_parameters or {"rope_type": "default"}
        cfg.rope_parameters = dict(rp, rope_theta=s["rope_theta"])
    else:  # transformers 4
        cfg.rope_theta = s["rope_theta"]
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"), no_init_weights():
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    if s["tied"]:
        model.lm_head.weight = model.model.embed_tokens.weight
    if any(not p.is_cuda or p.dtype != dtype for p in model.parameters()):
        model.to(device="cuda", dtype=dtype)  # not expected; the weights are random anyway
    with torch.no_grad():
        for prm in model.parameters():  # a tied weight appears once
            if prm.dim() == 1:
                prm.fill_(1.0)  # RMSNorm weights
            else:
                prm.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def new_cache(cfg):
    try:
        return DynamicCache(config=cfg)
    except TypeError:
        return DynamicCache()


def main():
    a, shape = parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    transformers.logging.set_verbosity_error()
    dev = torch.cuda.get_device_name()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {dev}, {a.dtype}",
          flush=True)
    t0 = time.perf_counter()
    model = build_model(shape, dtype)
    torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {shape} ({n_params / 1e9:.3f} B params, attn "
          f"{model.config._attn_implementation}) built in {init_s:.1f} s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(a.seed)
    lo = 256 if shape["vocab"] > 512 else 0  # skip the lowest ids, as folio-bench does

    def ids(b, n):
        return torch.randint(lo, shape["vocab"], (b, n), device="cuda", generator=gen)

    def fwd(x, cache):
        return model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def best_of(run):  # one warm-up, then the fastest of --repeat runs (seconds)
        run()
        return min(run() for _ in range(a.repeat))

    def prefill_once():
        x, cache = ids(1, a.prompt_tokens), new_cache(model.config)
        torch.cuda.synchronize()
        t = time.perf_counter()
        fwd(x, cache)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def decode_once(b):
        cache = new_cache(model.config)
        tok = fwd(ids(b, SEQ_PROMPT), cache).logits[:, -1, :].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.decode_tokens):
            tok = fwd(tok, cache).logits[:, -1, :].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    res = {"impl": "pytorch", "torch": torch.__version__, "transformers": transformers.__version__,
           "device": dev, "dtype": a.dtype, "shape": dict(shape, params=n_params),
           "init_s": round(init_s, 2), "prompt_tokens": a.prompt_tokens,
           "decode_tokens": a.decode_tokens, "seq_prompt_tokens": SEQ_PROMPT, "repeat": a.repeat}
    with torch.inference_mode():
        sec = best_of(prefill_once)
        res["prefill_tok_s"] = round(a.prompt_tokens / sec, 1)
        print(f"prefill {a.prompt_tokens} tokens: {sec * 1e3:.2f} ms, "
              f"{res['prefill_tok_s']:.1f} tok/s", flush=True)
        res["decode"] = []
        for b in a.batch_list:
            err = None
            try:
                sec = best_of(lambda: decode_once(b))
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if not isinstance(e, torch.cuda.OutOfMemoryError) and \
                        "memory" not in str(e) and "ALLOC" not in str(e):
                    raise
                err = str(e).splitlines()[0][:300]
            gc.collect()
            torch.cuda.empty_cache()
            if err:
                print(f"decode batch {b}: skipped ({err})", flush=True)
                res["decode"].append({"batch": b, "skipped": True, "error": err})
                continue
            row = {"batch": b, "tok_s": round(b * a.decode_tokens / sec, 1),
                   "step_ms": round(sec / a.decode_tokens * 1e3, 3)}
            print(f"decode batch {b}: {row['step_ms']:.3f} ms/step, {row['tok_s']:.1f} tok/s",
                  flush=True)
            res["decode"].append(row)
    res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(f"peak GPU memory allocated: {res['peak_mem_gib']:.2f} GiB", flush=True)
    line = json.dumps(res)
    if a.json:
        with open(a.json, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
