"""The gradient norm (logged and clipped to) is accumulated in float64: exact to rounding and the
same however a gradient is split over tensor-parallel ranks (fp32 ``_foreach_norm`` was 3e-5 low
on this shape and 1e-5 different between one tensor and its two halves)."""

import math

import numpy as np
import torch

from megatron_sft.training import optimizer as opt


def _exact_norm(tensors) -> float:
    return math.sqrt(math.fsum(float(x) ** 2 for t in tensors for x in t.double().reshape(-1).tolist()))


def test_output_layer_sized_gradient_norm_is_exact_and_split_independent(monkeypatch):
    monkeypatch.setattr(opt, "NORM_CHUNK_ELEMENTS", 1 << 20)  # two chunks per tensor below
    grad = torch.from_numpy(np.random.default_rng(0).standard_normal((32064, 64), dtype=np.float32)) * 1e-3
    cpu = torch.device("cpu")
    exact = _exact_norm([grad])
    whole = opt.sum_of_squares([grad], cpu).sqrt().item()
    by_rows = opt.sum_of_squares(list(grad.chunk(2, dim=0)), cpu).sqrt().item()  # TP=2, vocab split
    by_cols = opt.sum_of_squares(list(grad.chunk(2, dim=1)), cpu).sqrt().item()  # TP=2, row-parallel split
    for value in (whole, by_rows, by_cols):
        assert abs(value - exact) / exact < 1e-12, (value, exact)


def test_bf16_and_empty_gradients():
    cpu = torch.device("cpu")
    grads = [torch.full((3,), 2.0, dtype=torch.bfloat16), torch.zeros(0)]
    total = opt.sum_of_squares(grads, cpu)
    assert total.dtype == torch.float64 and total.item() == 12.0
    assert opt.sum_of_squares([], cpu).item() == 0.0
