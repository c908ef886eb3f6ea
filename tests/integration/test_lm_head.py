"""The supervised-only chunked LM head gives Megatron's loss and gradients (real GPTModel, fp32,
gloo): one process, TP=2, TP=2 with sequence parallelism, tied embeddings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("lm_head_worker.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("layout", [[], ["--tp", "2"], ["--tp", "2", "--sp"], ["--tied"], ["--tp", "2", "--tied"]],
                         ids=["tp1", "tp2", "tp2_sp", "tied", "tp2_tied"])
def test_supervised_head_equals_full_logits(tmp_path, layout):
    nproc = 2 if "--tp" in layout else 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), *layout, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert 0 < result["num_targets"] < result["num_positions"]  # a real selection, not every position
    assert result["num_params_compared"] >= 10
    assert result["loss"] > 1.0
    assert result["loss_diff"] < 1e-4 * result["loss"]
    assert result["token_loss_diff"] < 1e-5
    assert result["grad_max_diff"] < 1e-5 * max(result["grad_max_abs"], 1.0), result
