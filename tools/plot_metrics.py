#!/usr/bin/env python
"""Plot the metrics of one or several training runs as PNGs, runs overlaid for comparison.

    python tools/plot_metrics.py RUN [RUN ...] [--out DIR]

RUN: a run directory holding metrics.jsonl (``logging.dir``, else ``checkpoint.save``) or a
metrics .jsonl file itself (e.g. ``benchmarks/results/*.jsonl``); each is labelled by its name.
Writes one PNG per quantity into DIR (default ``RUN/plots`` for one run, ``./plots`` for several):
loss.png (train loss, solid; eval loss, dashed with markers), loss_by_source.png (per-source
``loss/<name>`` and ``eval_loss/<name>``, one panel per run, when a run has several sources),
tokens_per_s.png, tflops.png, mfu.png, memory.png, lr.png, grad_norm.png, step_time.png, and
overview.png with all of them. A quantity no run recorded (``mfu`` on CPU) is skipped and said so.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sft.training.metrics import read_metrics  # noqa: E402


class Run(NamedTuple):
    label: str
    train: List[dict]  # training-step records, by step
    evals: List[dict]  # evaluation records, by step


class Panel(NamedTuple):
    name: str  # PNG file stem
    title: str
    ylabel: str
    key: str


# "per GPU" is per rank (process) on CPU, and memory there is the process's peak RSS.
PANELS = [
    Panel("tokens_per_s", "Throughput (real tokens)", "tokens/s per GPU (per rank on CPU)", "tokens_per_s_per_gpu"),
    Panel("tflops", "Model TFLOP/s", "TFLOP/s per GPU (per rank on CPU)", "tflops_per_gpu"),
    Panel("mfu", "Model FLOPs utilisation", "MFU (fraction of peak)", "mfu"),
    Panel("memory", "Memory", "GiB (GPU peak allocated; CPU max RSS)", "memory_gib"),
    Panel("lr", "Learning rate", "lr", "lr"),
    Panel("grad_norm", "Gradient norm", "grad norm", "grad_norm"),
    Panel("step_time", "Step time", "seconds", "step_time_s"),
]


def labels_for(paths: List[Path]) -> List[str]:
    """Names for the runs: the file stem or directory name, with parent folders added to the
    names that collide until they differ (``a/checkpoints``, ``b/checkpoints``, ``llama_te``)."""
    parts = [list((p.with_suffix("") if p.is_file() else p).resolve().parts) for p in paths]
    depths = [1] * len(paths)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depths)]
        clashing = [i for i, name in enumerate(names) if names.count(name) > 1 and depths[i] < len(parts[i])]
        if not clashing:
            return names
        for i in clashing:
            depths[i] += 1


def load_runs(paths: List[str]) -> List[Run]:
    """Raises FileNotFoundError naming a path without metrics, ValueError for an empty file."""
    resolved = [Path(p) for p in paths]
    runs = []
    for path, label in zip(resolved, labels_for(resolved)):
        records = read_metrics(str(path))
        if not records:
            raise ValueError(f"{path}: the metrics file holds no records")
        runs.append(Run(label, [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]))
    return runs


def series(records: List[dict], key: str):
    """(steps, values) of ``key``; a missing or null value is NaN, so lines break there."""
    steps = [r["step"] for r in records]
    values = [r.get(key) for r in records]
    return steps, [math.nan if v is None else float(v) for v in values]


def has_values(runs: List[Run], key: str) -> bool:
    return any(r.get(key) is not None for run in runs for r in run.train + run.evals)


def source_names(run: Run) -> List[str]:
    keys = {k for r in run.train + run.evals for k in r if k.startswith(("loss/", "eval_loss/"))}
    return sorted({k.split("/", 1)[1] for k in keys})


def has_several_sources(run: Run) -> bool:
    """Several train or several eval sources (with one, its curve is the total's)."""
    train = {k for r in run.train for k in r if k.startswith("loss/")}
    evals = {k for r in run.evals for k in r if k.startswith("eval_loss/")}
    return len(train) > 1 or len(evals) > 1


# ---------------------------------------------------------------------------------- drawing


def draw_loss(ax, runs: List[Run]) -> None:
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        if run.train:
            ax.plot(*series(run.train, "loss"), color=color, lw=1.6, label=f"{run.label} train")
        if run.evals:
            ax.plot(*series(run.evals, "eval_loss"), color=color, ls="--", marker="o", ms=4,
                    label=f"{run.label} eval")
    _style(ax, "Loss (train solid, eval dashed)", "loss")


def draw_sources(ax, run: Run) -> None:
    for j, name in enumerate(source_names(run)):
        color = f"C{j % 10}"
        if any(f"loss/{name}" in r for r in run.train):
            ax.plot(*series(run.train, f"loss/{name}"), color=color, lw=1.4, label=f"{name} train")
        if any(f"eval_loss/{name}" in r for r in run.evals):
            ax.plot(*series(run.evals, f"eval_loss/{name}"), color=color, ls="--", marker="o", ms=4,
                    label=f"{name} eval")
    _style(ax, f"Loss by source: {run.label}", "loss")


def draw_panel(ax, runs: List[Run], panel: Panel) -> None:
    for i, run in enumerate(runs):
        if any(r.get(panel.key) is not None for r in run.train):
            ax.plot(*series(run.train, panel.key), color=f"C{i % 10}", lw=1.4, label=run.label)
    _style(ax, panel.title, panel.ylabel)


def _style(ax, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


# ---------------------------------------------------------------------------------- files


def _figure(num_axes: int = 1, columns: int = 1, size=(8, 4.5)):
    from matplotlib.figure import Figure  # the Agg canvas; no display, no pyplot state

    rows = math.ceil(num_axes / columns)
    fig = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[num_axes:]:
        ax.set_visible(False)
    return fig, axes[:num_axes]


def plot_runs(runs: List[Run], out: Path) -> List[Path]:
    """Write the PNGs; returns their paths (overview.png last)."""
    out.mkdir(parents=True, exist_ok=True)
    drawers = [("loss", lambda ax: draw_loss(ax, runs))]
    drawers += [(p.name, lambda ax, p=p: draw_panel(ax, runs, p)) for p in PANELS if has_values(runs, p.key)]
    written = []
    for name, draw in drawers:
        fig, (ax,) = _figure()
        draw(ax)
        written.append(_save(fig, out / f"{name}.png"))
    multi = [run for run in runs if has_several_sources(run)]
    if multi:
        fig, axes = _figure(len(multi))
        for ax, run in zip(axes, multi):
            draw_sources(ax, run)
        written.append(_save(fig, out / "loss_by_source.png"))
    fig, axes = _figure(len(drawers), columns=2, size=(7, 4))
    for ax, (_, draw) in zip(axes, drawers):
        draw(ax)
    written.append(_save(fig, out / "overview.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory (with metrics.jsonl) or .jsonl file")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/plots for one run dir, else ./plots)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plotting needs matplotlib: pip install -e .[plot] (bash install.sh installs it)", file=sys.stderr)
        return 2
    try:
        runs = load_runs(args.runs)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    single_dir = len(args.runs) == 1 and Path(args.runs[0]).is_dir()
    out = Path(args.out) if args.out else (Path(args.runs[0]) / "plots" if single_dir else Path("plots"))
    for path in plot_runs(runs, out):
        print(f"wrote {path}")
    missing = [p.key for p in PANELS if not has_values(runs, p.key)]
    if missing:
        print(f"not plotted (no values recorded): {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
