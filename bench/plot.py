#!/usr/bin/env python3
"""Draws folio-bench's figures as a PNG from the JSON it writes (folio-bench ... --png FILE).

  plot.py RESULTS.json OUT.png

engine: decode tokens/s against batch size, folio beside llama.cpp (prefill in the title).
prefix: mean first-token time and completed requests/s against offered load, prefix cache on
("prefix") beside off ("base").
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_engine(d, ax_list):
    (ax,) = ax_list
    for key, style in (("folio", "o-"), ("llama_cpp", "s--")):
        fig = d.get(key)
        if not fig:
            continue
        rows = fig.get("decode", [])
        ax.plot([r["batch"] for r in rows], [r["tok_s"] for r in rows], style,
                label=f'{fig.get("impl", key)} (prefill {fig.get("prefill_tok_s", 0):.0f} tok/s)')
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f'folio-bench engine: {d.get("model", "").rsplit("/", 1)[-1]}, {d.get("threads", "?")} threads')
    ax.grid(True, alpha=0.3)
    ax.legend()


def plot_prefix(d, ax_list):
    ttft, thr = ax_list
    methods = sorted({r["method"] for r in d["rows"]})
    for i, m in enumerate(methods):
        color = f"C{i}"
        rows = sorted((r for r in d["rows"] if r["method"] == m), key=lambda r: r["load_qps"])
        load = [r["load_qps"] for r in rows]
        ttft.plot(load, [r["mean_ttft_s"] * 1e3 for r in rows], "o-", color=color, label=f"{m} mean")
        ttft.plot(load, [r["p99_ttft_s"] * 1e3 for r in rows], "x:", color=color, label=f"{m} p99")
        thr.plot(load, [r["req_per_s"] for r in rows], "o-", color=color, label=m)
    ttft.set_yscale("log")
    ttft.set_xlabel("offered load (requests/s)")
    ttft.set_ylabel("time to first token (ms)")
    ttft.set_title("first-token time against load")
    thr.set_xlabel("offered load (requests/s)")
    thr.set_ylabel("completed requests/s")
    thr.set_title("throughput against load")
    for ax in ax_list:
        ax.grid(True, alpha=0.3)
        ax.legend()


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot.py RESULTS.json OUT.png")
    with open(sys.argv[1]) as f:
        d = json.load(f)
    kind = d.get("benchmark") or ("prefix" if "rows" in d and d["rows"] and "method" in d["rows"][0] else None)
    if kind == "engine":
        fig, axes = plt.subplots(1, 1, figsize=(7, 4.5))
        plot_engine(d, [axes])
    elif kind == "prefix":
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        plot_prefix(d, list(axes))
    else:
        sys.exit(f"plot.py: no plot for this JSON (benchmark {kind!r})")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
