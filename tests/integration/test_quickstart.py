"""The README's first command: examples/quickstart.py on a fresh checkout (here with fewer steps)
builds the tokenizer, preprocesses the bundled conversations, trains with a falling loss,
evaluates, saves and runs --eval-only; its output ends with what it produced and the next
commands, which work as printed; stderr carries no third-party notices."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from megatron_sft.mcore import NOTICE_PATTERNS
from tests.integration.trainer_helpers import REPO, free_port

pytestmark = pytest.mark.slow


def test_quickstart_trains_evaluates_and_saves(tmp_path):
    out = tmp_path / "quickstart"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "examples/quickstart.py", "--output-dir", str(out), "--train-steps", "60"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (out / "checkpoints" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train = [r for r in records if "loss" in r]
    assert train[-1]["step"] == 60 and train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "60"
    eval_line = re.search(r"--eval-only: eval_loss=(\S+) eval_tokens=(\d+)", proc.stdout)
    assert eval_line and int(eval_line.group(2)) > 0
    evals = [r for r in records if "eval_loss" in r]
    assert float(eval_line.group(1)) == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    # one row per (kind, step): the --eval-only record of step 60 replaced the training run's
    assert [r["step"] for r in evals] == [15, 30, 45, 60] and len(set(lines)) == len(lines)
    _check_output(proc, out)


def test_quickstart_runs_shorter_than_the_recipe_warmup(tmp_path):
    """The recipe warms up 20 steps; --train-steps 8 used to stop at the config check (warmup
    longer than the decay)."""
    out = tmp_path / "short"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "examples/quickstart.py", "--output-dir", str(out), "--train-steps", "8"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if "loss" in r) == 8


def _check_output(proc: subprocess.CompletedProcess, out) -> None:
    summary = proc.stdout[proc.stdout.index("\nproduced:"):]
    for expected in (f"packed data  {out / 'data' / 'train'}", f"checkpoint   {out / 'checkpoints' / 'iter_0000060'}",
                     f"metrics      {out / 'checkpoints' / 'metrics.jsonl'}", "eval loss    ", "at step 60"):
        assert expected in summary, summary
    assert "None" not in proc.stderr and "mfu" not in proc.stderr and "tokens/s/rank" in proc.stderr
    for notice in NOTICE_PATTERNS:
        assert not re.search(notice, proc.stderr), notice
    commands = re.findall(r"^  (python \S+/(?:convert_megatron_to_hf|plot_metrics)\.py .*?)(?:    #.*)?$",
                          summary, re.M)
    assert len(commands) == 2, summary
    for command in commands:  # the next steps work as printed
        argv = shlex.split(command)
        done = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, command + "\n" + done.stderr[-3000:]
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "model.safetensors.index.json").is_file()
    assert (out / "checkpoints" / "plots" / "loss.png").stat().st_size > 5000
