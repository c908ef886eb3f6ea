"""The pure conversion transforms and the key-map engine (no Megatron, no files)."""

from __future__ import annotations

import pytest
import torch

from megatron_sft.config import ModelConfig
from megatron_sft.conversion.common import (
    GATE_UP,
    QKV,
    ConversionError,
    KeyRule,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    expand_rules,
    fuse_gate_up,
    interleave_qkv,
    split_gate_up,
    split_qkv,
)


def _cfg(heads=4, groups=2, head_dim=3, hidden=8, ffn=5) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                       vocab_size=16, num_query_groups=groups, kv_channels=head_dim)


def _labelled(num_heads: int, head_dim: int, base: float, hidden: int = 8) -> torch.Tensor:
    """Rows of head h are filled with ``base + h``: readable layouts after fusing."""
    heads = torch.arange(num_heads, dtype=torch.float32).repeat_interleave(head_dim)
    return (base + heads)[:, None].expand(num_heads * head_dim, hidden).clone()


def test_qkv_is_grouped_per_query_group():
    # 4 heads, 2 groups: Megatron rows are [q0 q1 k0 v0 | q2 q3 k1 v1].
    cfg = _cfg(heads=4, groups=2, head_dim=3)
    q, k, v = _labelled(4, 3, 0.0), _labelled(2, 3, 10.0), _labelled(2, 3, 20.0)
    fused = interleave_qkv(q, k, v, cfg)
    row_heads = fused[::3, 0].tolist()
    assert row_heads == [0, 1, 10, 20, 2, 3, 11, 21]
    # A TP=2 rank's contiguous half is exactly its query group (what Megatron shards).
    assert fused.chunk(2)[1][::3, 0].tolist() == [2, 3, 11, 21]


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (4, 1), (8, 2)], ids=["gqa", "mha", "mqa", "gqa4"])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_round_trip(heads, groups, bias):
    cfg = _cfg(heads=heads, groups=groups, head_dim=4, hidden=16)
    shape = (lambda n: (n,)) if bias else (lambda n: (n, 16))
    q, k, v = torch.randn(shape(heads * 4)), torch.randn(shape(groups * 4)), torch.randn(shape(groups * 4))
    fused = interleave_qkv(q, k, v, cfg)
    assert fused.shape == shape((heads + 2 * groups) * 4)
    for a, b in zip(split_qkv(fused, cfg), (q, k, v)):
        assert torch.equal(a, b) and a.is_contiguous()


def test_qkv_mha_matches_megatron_per_head_layout():
    # MHA: one head per group -> [q0 k0 v0 | q1 k1 v1 | ...].
    cfg = _cfg(heads=2, groups=2, head_dim=1)
    fused = interleave_qkv(_labelled(2, 1, 0.0), _labelled(2, 1, 10.0), _labelled(2, 1, 20.0), cfg)
    assert fused[:, 0].tolist() == [0, 10, 20, 1, 11, 21]


def test_qkv_dtype_and_bits_preserved():
    cfg = _cfg(heads=4, groups=2, head_dim=4, hidden=16)
    q, k, v = (torch.randn(n * 4, 16).to(torch.bfloat16) for n in (4, 2, 2))
    fused = interleave_qkv(q, k, v, cfg)
    assert fused.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, cfg), (q, k, v)))


def test_gate_up_is_gate_then_up():
    cfg = _cfg(ffn=5)
    gate, up = torch.zeros(5, 8), torch.ones(5, 8)
    fc1 = fuse_gate_up(gate, up, cfg)
    assert fc1.shape == (10, 8) and fc1[:5].eq(0).all() and fc1[5:].eq(1).all()
    g, u = split_gate_up(fc1, cfg)
    assert torch.equal(g, gate) and torch.equal(u, up)


def test_shape_mismatch_is_a_clear_error():
    cfg = _cfg(heads=4, groups=2, head_dim=3)
    with pytest.raises(ConversionError, match="k: expected 6 rows"):
        interleave_qkv(torch.zeros(12, 8), torch.zeros(5, 8), torch.zeros(6, 8), cfg)
    with pytest.raises(ConversionError, match="linear_fc1: expected 10 rows"):
        split_gate_up(torch.zeros(9, 8), cfg)


def test_transforms_run_on_meta_device():
    cfg = _cfg(heads=64, groups=8, head_dim=128, hidden=8192, ffn=28672)
    with torch.device("meta"):
        q, k, v = torch.empty(8192, 8192), torch.empty(1024, 8192), torch.empty(1024, 8192)
        fused = interleave_qkv(q, k, v, cfg)
        fc1 = fuse_gate_up(torch.empty(28672, 8192), torch.empty(28672, 8192), cfg)
    assert fused.is_meta and fused.shape == (10240, 8192) and fc1.shape == (57344, 8192)


def test_expand_rules_fills_layer_and_keeps_order():
    rules = [
        KeyRule("emb", ("e",)),
        KeyRule("l.{}.qkv", ("q.{}", "k.{}", "v.{}"), QKV),
        KeyRule("l.{}.fc1", ("g.{}", "u.{}"), GATE_UP),
        KeyRule("norm", ("n",)),
    ]
    out = expand_rules(rules, 2)
    assert [r.megatron for r in out] == ["emb", "l.0.qkv", "l.0.fc1", "l.1.qkv", "l.1.fc1", "norm"]
    assert out[3].hf == ("q.1", "k.1", "v.1") and out[3].layer == 1 and out[0].layer is None


def test_layer_pattern_on_one_side_is_rejected():
    with pytest.raises(AssertionError):
        KeyRule("decoder.layers.{}.x", ("model.x",))


def test_engine_round_trip():
    cfg = _cfg(heads=4, groups=2, head_dim=2, hidden=8, ffn=6)
    rules = expand_rules([
        KeyRule("l.{}.qkv", ("q.{}", "k.{}", "v.{}"), QKV),
        KeyRule("l.{}.fc1", ("g.{}", "u.{}"), GATE_UP),
        KeyRule("out", ("head",)),
    ], 2)
    shapes = {"q": (8, 8), "k": (4, 8), "v": (4, 8), "g": (6, 8), "u": (6, 8), "head": (16, 8)}
    hf = {k: torch.randn(shapes[k.split(".")[0]]) for r in rules for k in r.hf}
    megatron = dict(convert_hf_to_megatron(hf.__getitem__, rules, cfg))
    assert set(megatron) == {"l.0.qkv", "l.1.qkv", "l.0.fc1", "l.1.fc1", "out"}
    back = dict(convert_megatron_to_hf(megatron.__getitem__, rules, cfg))
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
