"""The README's first command: examples/quickstart.py on a fresh checkout (here with fewer steps)
builds the tokenizer, preprocesses the bundled conversations, trains with a falling loss,
evaluates, saves and runs --eval-only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.integration.trainer_helpers import REPO, free_port

pytestmark = pytest.mark.slow


def test_quickstart_trains_evaluates_and_saves(tmp_path):
    out = tmp_path / "quickstart"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "examples/quickstart.py", "--output-dir", str(out), "--train-steps", "60"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert train[-1]["step"] == 60 and train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "60"
    eval_line = re.search(r"--eval-only: eval_loss=(\S+) eval_tokens=(\d+)", proc.stdout)
    assert eval_line and int(eval_line.group(2)) > 0
    assert float(eval_line.group(1)) == pytest.approx([r for r in records if "eval_loss" in r][-1]["eval_loss"], rel=1e-5)
