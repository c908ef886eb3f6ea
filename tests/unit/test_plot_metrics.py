"""tools/plot_metrics.py on synthetic metrics files: PNGs for run directories and benchmark .jsonl
files, runs overlaid and labelled, absent quantities skipped, clear errors for missing metrics."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from PIL import Image

from tests.integration.trainer_helpers import REPO

pytest.importorskip("matplotlib", reason="plots need the plot extra (pip install -e .[plot])")

_spec = importlib.util.spec_from_file_location("plot_metrics", REPO / "tools" / "plot_metrics.py")
plot_metrics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_metrics)


def write_run(path, steps: int, sources=("train",), mfu=None, eval_every: int = 5):
    """A metrics.jsonl like the trainer's: falling loss per source, evals every ``eval_every``."""
    rows = []
    for step in range(1, steps + 1):
        losses = {name: 5.0 * math.exp(-step / (10 + i)) for i, name in enumerate(sources)}
        rows.append({"step": step, "loss": sum(losses.values()) / len(losses), "grad_norm": 2.0 / step,
                     "lr": 1e-3 * min(1.0, step / 5), "supervised_tokens": 800, "tokens_per_s_per_gpu": 4000.0 + step,
                     "tflops_per_gpu": 0.02, "mfu": mfu, "step_time_s": 0.4, "memory_gib": 0.48, "epoch": 0,
                     **{f"loss/{name}": value for name, value in losses.items()}})
        if step % eval_every == 0:
            rows.append({"step": step, "eval_loss": rows[-1]["loss"] + 0.3, "eval_tokens": 200,
                         **{f"eval_loss/{name}": value + 0.3 for name, value in losses.items()}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 5000, path
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 600
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20  # not blank


def test_one_run_dir(tmp_path, capsys):
    run = tmp_path / "runs" / "tiny"
    write_run(run / "metrics.jsonl", 30)
    assert plot_metrics.main([str(run)]) == 0
    out = capsys.readouterr().out
    for name in ("loss", "tokens_per_s", "tflops", "memory", "lr", "grad_norm", "step_time", "overview"):
        assert_png(run / "plots" / f"{name}.png")
        assert f"wrote {run / 'plots' / name}.png" in out
    assert not (run / "plots" / "mfu.png").exists() and "not plotted (no values recorded): mfu" in out
    assert not (run / "plots" / "loss_by_source.png").exists()  # one source: its curve is the loss


def test_several_runs_and_benchmark_files_overlaid(tmp_path, capsys):
    a = write_run(tmp_path / "a" / "checkpoints" / "metrics.jsonl", 20, sources=("chat", "tools")).parent
    b = write_run(tmp_path / "b" / "checkpoints" / "metrics.jsonl", 25).parent
    bench = write_run(tmp_path / "results" / "llama_te.jsonl", 20, mfu=0.34, eval_every=100)
    out = tmp_path / "plots"
    assert plot_metrics.main([str(a), str(b), str(bench), "--out", str(out)]) == 0
    for name in ("loss", "mfu", "loss_by_source", "overview"):
        assert_png(out / f"{name}.png")
    assert "not plotted" not in capsys.readouterr().out
    runs = plot_metrics.load_runs([str(a), str(b), str(bench)])
    assert [r.label for r in runs] == ["a/checkpoints", "b/checkpoints", "llama_te"]
    assert [len(r.evals) for r in runs] == [4, 5, 0] and [len(r.train) for r in runs] == [20, 25, 20]


def test_loss_panel_draws_train_and_eval_per_run(tmp_path):
    runs = plot_metrics.load_runs([str(write_run(tmp_path / "x" / "metrics.jsonl", 10).parent)])
    fig, (ax,) = plot_metrics._figure()
    plot_metrics.draw_loss(ax, runs)
    train, evals = ax.get_lines()
    assert [line.get_label() for line in ax.get_lines()] == ["x train", "x eval"]
    assert list(train.get_xdata()) == list(range(1, 11)) and list(evals.get_xdata()) == [5, 10]
    assert list(evals.get_ydata()) == pytest.approx([r["eval_loss"] for r in runs[0].evals])


def test_missing_or_empty_metrics_are_clear_errors(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    assert plot_metrics.main([str(tmp_path / "empty_run")]) == 2
    assert f"error: no metrics file at {tmp_path / 'empty_run' / 'metrics.jsonl'}" in capsys.readouterr().err
    (tmp_path / "blank.jsonl").write_text("\n")
    assert plot_metrics.main([str(tmp_path / "blank.jsonl")]) == 2
    assert "the metrics file holds no records" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()
