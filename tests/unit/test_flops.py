"""FLOPs from real documents: attention is per conversation, not per pack."""

from __future__ import annotations

import pytest

from megatron_sft.config import ModelConfig
from megatron_sft.training.flops import causal_pairs, peak_tflops, step_flops

MODEL = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, vocab_size=100,
                    num_query_groups=2)


def test_causal_pairs():
    assert causal_pairs([1, 2, 3]) == 1 + 3 + 6
    assert causal_pairs([]) == 0


def test_packed_attention_costs_per_document():
    one_long = step_flops(MODEL, 4096, causal_pairs([4096]))
    eight_short = step_flops(MODEL, 4096, causal_pairs([512] * 8))
    dense = step_flops(MODEL, 4096, 0)
    assert one_long > eight_short > dense
    # attention part scales with sum L^2: 8 x 512^2 is ~1/8 of 4096^2
    assert (eight_short - dense) / (one_long - dense) == pytest.approx(8 * 512 * 513 / (4096 * 4097))


def test_dense_flops_by_hand():
    h, f, v, n, g, d, layers = 64, 128, 100, 4, 2, 16, 2
    per_token = layers * (2 * h * (n * d + 2 * g * d) + 2 * n * d * h + 6 * h * f) + 2 * h * v
    assert step_flops(MODEL, 10, 0) == 3 * 10 * per_token
    assert step_flops(MODEL, 10, 7) - step_flops(MODEL, 10, 0) == 3 * layers * 4 * n * d * 7


def test_peak_only_for_known_devices():
    assert peak_tflops("NVIDIA H100 80GB HBM3", True) == 989.0
    assert peak_tflops(None, True) is None and peak_tflops("Some GPU", True) is None
