"""Megatron-Core on CPU (gloo): packed THD attention, parallel layouts vs one process,
checkpoint resharding and canonical keys. Each scenario runs in its own torchrun processes
(``mcore_worker.py``) because Megatron's parallel state and our CPU patches are process-global.

Reference: one process (TP=PP=DP=1) builds the tiny model, saves it, and records 2 steps of
mcore DDP + Adam (clip_grad 1) through ``get_forward_backward_func`` (4 micro-batches of packed THD data).
Every layout loads that checkpoint and must reproduce the losses, the per-parameter gradient
norms of both steps (so the optimizer step matches too) and a forward-only evaluation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("mcore_worker.py")
REPO = Path(__file__).resolve().parents[2]
LOSS_ATOL = 2e-5  # fp32 noise on losses ~6.2
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4


def run_worker(out: Path, *args: str, nproc: int = 1, timeout: int = 240) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({' '.join(args)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcore")
    result = run_worker(root / "ref", "train", "--save-initial", str(root / "initial"))
    return root, result


def assert_same_training(result: dict, ref: dict) -> None:
    assert result["losses"] == pytest.approx(ref["losses"], abs=LOSS_ATOL)
    assert result["eval_loss"] == pytest.approx(ref["eval_loss"], abs=LOSS_ATOL)
    # Megatron's total norm across model-parallel ranks; > 1 so clip_grad=1 really clips.
    assert result.get("total_grad_norms") == pytest.approx(ref["total_grad_norms"], rel=GRAD_RTOL)
    assert min(ref["total_grad_norms"]) > 1.0
    for step, (got, want) in enumerate(zip(result["grad_norms"], ref["grad_norms"])):
        assert got.keys() == want.keys()
        assert got["_spread"] < GRAD_ATOL, "replicas of a parameter disagree"
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=GRAD_ATOL, rel=GRAD_RTOL), (step, key)


def test_packed_thd_equals_each_conversation_alone(tmp_path):
    result = run_worker(tmp_path, "packed")
    assert result["num_conversations"] >= 3
    assert result["megatron_patched"] is (not torch.cuda.is_available())
    assert result["worst_thd"] < 1e-5  # same conversation as a one-segment THD batch
    assert result["worst_sbhd"] < 1e-5  # ... and unpacked (no PackedSeqParams)
    assert result["worst_padded"] < 1e-5  # padded layout (cu_seqlens != cu_seqlens_padded)


def test_reference_checkpoint_has_canonical_te_keys(reference):
    _, ref = reference
    keys = ref["checkpoint_keys"]
    # one entry per global layer (non_homogeneous_layers), the layout the converter writes
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in keys
    assert "decoder.layers.self_attention.linear_qkv.weight" not in keys
    assert not [k for k in keys if "input_layernorm" in k or "pre_mlp_layernorm" in k or "_extra_state" in k]
    assert ref["losses"][0] == pytest.approx(6.24, abs=0.1)  # ~ln(512): a random model


@pytest.mark.parametrize(
    "name, nproc, args",
    [
        ("tp2_sp", 2, ["--tp", "2", "--sp"]),
        ("pp2", 2, ["--pp", "2"]),
        ("pp2_vpp2", 2, ["--pp", "2", "--vpp", "2", "--fixed-length"]),
        ("dp2", 2, []),
        ("recompute", 1, ["--recompute"]),  # activation recompute saves/restores the CPU RNG
    ],
)
def test_layout_matches_one_process(reference, tmp_path, name, nproc, args):
    root, ref = reference
    result = run_worker(tmp_path, "train", "--load", str(root / "initial"), *args, nproc=nproc)
    assert_same_training(result, ref)


def test_tp2_matches_and_its_checkpoint_loads_at_tp1(reference, tmp_path):
    root, ref = reference
    tp2 = run_worker(tmp_path / "tp2", "train", "--tp", "2", "--load", str(root / "initial"),
                     "--save-final", str(tmp_path / "after"), nproc=2)
    assert_same_training(tp2, ref)
    tp1 = run_worker(tmp_path / "tp1", "train", "--steps", "0", "--load", str(tmp_path / "after"))
    # Identical outputs: per-token losses of the evaluation batches after the TP=2 training.
    assert len(tp1["eval_token_losses"]) == len(tp2["eval_token_losses"]) > 100
    worst = max(abs(a - b) for a, b in zip(tp1["eval_token_losses"], tp2["eval_token_losses"]))
    assert worst < 1e-5
    assert tp1["eval_loss"] != pytest.approx(ref["losses"][0], abs=1e-3)  # the trained weights were loaded
