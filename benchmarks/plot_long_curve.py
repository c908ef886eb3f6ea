#!/usr/bin/env python
"""Peak memory, tokens/s and useful TFLOP/s against pack length, from trainer metrics files.

    python benchmarks/plot_long_curve.py --out benchmarks/results/long_packs_curve.png \
        16384=benchmarks/results/llama1b_h200_long16384_recompute_mlp.jsonl 32768=...

Each file is one run's metrics.jsonl at that pack length; medians over the steps after the first
``--warmup`` (default 3); peak memory is the largest ``memory_gib`` of the run. Also prints the
figures as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics


def summarize(path: str, warmup: int) -> dict:
    rows = [r for r in map(json.loads, open(path)) if "step_time_s" in r]
    late = [r for r in rows if r["step"] > warmup] or rows
    return {"step_time_s": statistics.median(r["step_time_s"] for r in late),
            "tokens_per_s": statistics.median(r["tokens_per_s_per_gpu"] for r in late),
            "tflops": statistics.median(r["tflops_per_gpu"] for r in late),
            "peak_gib": max(r["memory_gib"] for r in rows)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="LENGTH=metrics.jsonl")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--title", default="1.5B Llama-3.2-1B shape, one H200, bf16, recompute_modules [mlp]")
    args = p.parse_args(argv)
    points = sorted((int(length), summarize(path, args.warmup))
                    for length, path in (run.split("=", 1) for run in args.runs))
    print("| pack length | step (s) | tokens/s | useful TFLOP/s | peak GiB |\n|---|---|---|---|---|")
    for length, s in points:
        print(f"| {length:,} | {s['step_time_s']:.3f} | {s['tokens_per_s']:,.0f} | {s['tflops']:.1f} | {s['peak_gib']:.1f} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [length // 1024 for length, _ in points]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("peak_gib", "tokens_per_s", "tflops"),
                              ("peak memory (GiB)", "tokens/s", "useful TFLOP/s")):
        ax.plot(lengths, [s[key] for _, s in points], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n}K" for n in lengths])
        ax.set_xlabel("pack length (tokens)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(141, color="grey", linestyle="--", linewidth=1)
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
