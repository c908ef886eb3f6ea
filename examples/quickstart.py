#!/usr/bin/env python
"""Quickstart: fine-tune a tiny chat model on CPU in a few minutes, no GPU and no network.

    python examples/quickstart.py [--output-dir runs/quickstart] [--train-steps 200]

1. builds a tiny byte-level BPE tokenizer with a ChatML template;
2. splits the bundled examples/data/sample_conversations.jsonl into train and validation files
   and packs them with tools/preprocess_data.py (loss masks on assistant turns only);
3. trains the model of yaml_configs/tiny_cpu.yaml with pretrain_sft.py (a single process; the
   GPU is used when present), evaluating and saving checkpoints on the way;
4. runs pretrain_sft.py --eval-only on the last checkpoint, prints the loss curve, what it
   produced (data, checkpoint, metrics, eval loss) and the next commands (export, plots).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "examples" / "data" / "sample_conversations.jsonl"
CONFIG = REPO / "yaml_configs" / "tiny_cpu.yaml"


def split_samples(out_dir: Path, every: int = 7) -> tuple[Path, Path]:
    """Every ``every``-th conversation goes to validation, the rest to training."""
    lines = [line for line in SAMPLES.read_text().splitlines() if line.strip()]
    train, valid = out_dir / "train.jsonl", out_dir / "valid.jsonl"
    train.write_text("".join(line + "\n" for i, line in enumerate(lines) if i % every != every - 1))
    valid.write_text("".join(line + "\n" for i, line in enumerate(lines) if i % every == every - 1))
    return train, valid


def sh(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([str(c) for c in cmd], check=True, cwd=REPO, env=env, **kwargs)


def _rel(path: Path) -> str:
    """``path`` relative to the working directory when inside it (short, ready to paste)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def report_curves(save: Path) -> tuple[list, list]:
    """Print the train and eval loss curves of ``save``/metrics.jsonl; returns their records."""
    from megatron_sft.training.metrics import read_metrics

    records = read_metrics(str(save))
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    print("\nloss curve (step: train loss):")
    print("  " + "  ".join(f"{r['step']}: {r['loss']:.3f}" for r in train))
    print("validation (step: eval loss):")
    print("  " + "  ".join(f"{r['step']}: {r['eval_loss']:.3f}" for r in evals))
    return train, evals


def print_summary(out: Path, save: Path, last_eval: Optional[dict], eval_only: str) -> None:
    """What the run produced and the commands that come next."""
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    tensorboard = save / "tensorboard"
    print("\nproduced:")
    print(f"  tokenizer    {_rel(out / 'tokenizer')}")
    print(f"  packed data  {_rel(out / 'data' / 'train')}, {_rel(out / 'data' / 'valid')}"
          f"  (+ .meta.json, .report.json)")
    print(f"  checkpoint   {_rel(save / f'iter_{latest:07d}')}")
    print(f"  metrics      {_rel(save / 'metrics.jsonl')}" + (f", {_rel(tensorboard)}" if tensorboard.is_dir() else ""))
    if last_eval is not None:
        print(f"  eval loss    {last_eval['eval_loss']:.4f} at step {last_eval['step']} "
              f"({last_eval['eval_tokens']} tokens)")
    print(f"--eval-only: {eval_only}")
    print("\nnext:")
    tools = REPO / "tools"
    print(f"  python {_rel(tools / 'convert_megatron_to_hf.py')} --megatron {_rel(save)} --out {_rel(out / 'hf')}"
          "    # export a Hugging Face model")
    print(f"  python {_rel(tools / 'plot_metrics.py')} {_rel(save)}    # PNGs: loss, eval loss, speed, memory, lr")
    if tensorboard.is_dir():
        print(f"  tensorboard --logdir {_rel(tensorboard)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "quickstart"))
    parser.add_argument("--train-steps", type=int, default=200)
    args = parser.parse_args()
    out = Path(args.output_dir).resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "data").mkdir(parents=True)

    sys.path.insert(0, str(REPO))
    from megatron_sft.testing.tiny_tokenizer import build_tiny_tokenizer

    tokenizer_dir = out / "tokenizer"
    build_tiny_tokenizer(tokenizer_dir)
    print(f"tokenizer: {tokenizer_dir}")

    train_jsonl, valid_jsonl = split_samples(out / "data")
    for split, jsonl in (("train", train_jsonl), ("valid", valid_jsonl)):
        sh([sys.executable, REPO / "tools" / "preprocess_data.py", "--input", jsonl, "--tokenizer", tokenizer_dir,
            "--output-prefix", out / "data" / split, "--seq-length", 512, "--no-progress"])

    save = out / "checkpoints"
    import torch

    # On a GPU: bf16 (fp32 main params in the optimizer); the torch backend's varlen kernel needs it.
    gpu = ["--training.bf16=true"] if torch.cuda.is_available() else []
    overrides = [*gpu, f"--data.train_prefix={out / 'data' / 'train'}", f"--data.valid_prefix={out / 'data' / 'valid'}",
                 f"--checkpoint.save={save}", f"--training.train_steps={args.train_steps}",
                 f"--training.eval_interval_steps={max(args.train_steps // 4, 1)}",
                 # the recipe warms up 20 steps; a shorter run warms up its first tenth
                 f"--training.lr_warmup_steps={min(20, args.train_steps // 10)}"]
    sh([sys.executable, REPO / "pretrain_sft.py", "--config", CONFIG, *overrides])
    result = sh([sys.executable, REPO / "pretrain_sft.py", "--config", CONFIG, *overrides, "--eval-only",
                 f"--checkpoint.load={save}"], stdout=subprocess.PIPE, text=True)

    train, evals = report_curves(save)
    print_summary(out, save, evals[-1] if evals else None, result.stdout.strip())
    # The bundled data takes the loss below half its start within ~50 steps; shorter runs are not judged.
    if args.train_steps >= 50 and train[-1]["loss"] >= 0.5 * train[0]["loss"]:
        print("warning: the loss did not halve; something is off", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
