"""GPU checks of the model side (run on the GPU box; skipped without CUDA / Transformer Engine):
our CP split == TE's, varlen attention == the per-segment reference, and one checkpoint for
both backends (torch-backend checkpoint -> TE model and back, same outputs within bf16 noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _te_ext():
    try:
        import transformer_engine.pytorch  # noqa: F401  (loads TE's libraries first)
        import transformer_engine_torch as tex

        return tex
    except Exception:
        return None


needs_te = pytest.mark.skipif(not torch.cuda.is_available() or _te_ext() is None,
                              reason="needs CUDA and Transformer Engine")


@needs_te
@pytest.mark.parametrize("cp", [2, 4])
def test_cp_partition_matches_transformer_engine(cp):
    from megatron_sft.data.batches import cp_partition_indices

    tex = _te_ext()
    rng = np.random.default_rng(cp)
    lengths = rng.integers(1, 9, 7) * 2 * cp
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(cu[-1])
    for rank in range(cp):
        theirs = tex.thd_get_partitioned_indices(torch.from_numpy(cu).cuda(), total, cp, rank)
        ours = cp_partition_indices(cu, total, cp, rank)
        assert theirs.cpu().tolist() == ours.tolist(), rank


@needs_cuda
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_varlen_attention_matches_per_segment_reference(groups):
    from megatron_sft.model.attention import _varlen_attn, _varlen_causal, causal_attention_per_segment

    if _varlen_attn is None:
        pytest.skip("torch.nn.attention.varlen not in this torch")
    torch.manual_seed(0)
    real, padded = [37, 120, 5, 64], [40, 120, 8, 64]
    cu = torch.tensor([0, *np.cumsum(real)], dtype=torch.int32, device="cuda")
    cu_padded = torch.tensor([0, *np.cumsum(padded)], dtype=torch.int32, device="cuda")
    t = sum(padded)
    q = torch.randn(t, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(t, groups, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(t, groups, 64, device="cuda", dtype=torch.bfloat16)
    out = _varlen_causal(q, k, v, cu_padded, max(padded), 64 ** -0.5)
    ref = causal_attention_per_segment(q.float(), k.float(), v.float(), cu, cu_padded, scale=64 ** -0.5)
    starts = cu_padded[:-1].tolist()
    for start, n in zip(starts, real):
        seg = slice(start, start + n)
        assert (out[seg].float() - ref[seg]).abs().max().item() < 2e-2


def _run(tmp_path, *args, nproc=1):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
    from test_mcore import run_worker

    return run_worker(tmp_path, *args, nproc=nproc)


@needs_te
def test_one_checkpoint_loads_into_both_backends(tmp_path):
    torch_run = _run(tmp_path / "torch", "train", "--bf16", "--backend", "torch", "--steps", "1",
                     "--save-initial", str(tmp_path / "initial"), "--save-final", str(tmp_path / "torch_final"))
    te_run = _run(tmp_path / "te", "train", "--bf16", "--backend", "te", "--steps", "1",
                  "--load", str(tmp_path / "initial"), "--save-final", str(tmp_path / "te_final"))
    assert te_run["losses"][0] == pytest.approx(torch_run["losses"][0], abs=3e-2)
    diff = np.abs(np.array(te_run["eval_token_losses"]) - np.array(torch_run["eval_token_losses"]))
    assert diff.mean() < 2e-2 and diff.max() < 0.2
    # And back: the TE checkpoint into the torch backend reproduces TE's outputs.
    back = _run(tmp_path / "back", "train", "--bf16", "--backend", "torch", "--steps", "0",
                "--load", str(tmp_path / "te_final"))
    diff = np.abs(np.array(back["eval_token_losses"]) - np.array(te_run["eval_token_losses"]))
    assert diff.mean() < 2e-2 and diff.max() < 0.2


@needs_te
@pytest.mark.parametrize("backend", ["te", "torch"])
def test_packed_equals_alone_on_gpu(tmp_path, backend):
    result = _run(tmp_path, "packed", "--bf16", "--backend", backend)
    # bf16: a different token count changes GEMM tiling, so allow bf16 noise on losses ~6.
    assert max(result["worst_thd"], result["worst_sbhd"], result["worst_padded"]) < 5e-2
