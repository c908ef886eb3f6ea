"""The torch-backend core attention: packed segments are independent, GQA, padding (CPU)."""

import math
from types import SimpleNamespace

import pytest
import torch

import megatron_sft.mcore  # noqa: F401
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sft.model.attention import TorchCoreAttention, causal_attention_per_segment

HEADS, GROUPS, DIM = 4, 2, 16


def naive_causal(q, k, v):
    """Textbook attention on one segment: q [n, h, d], k/v [n, g, d]; query head j uses group
    j // (h/g)."""
    n, h, d = q.shape
    rep = h // k.shape[1]
    out = torch.empty_like(q)
    for j in range(h):
        kj, vj = k[:, j // rep], v[:, j // rep]
        scores = q[:, j] @ kj.T / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out[:, j] = scores.softmax(-1) @ vj
    return out


def random_qkv(total, seed=0, groups=GROUPS):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(total, HEADS, DIM, generator=g, dtype=torch.float64),
            torch.randn(total, groups, DIM, generator=g, dtype=torch.float64),
            torch.randn(total, groups, DIM, generator=g, dtype=torch.float64))


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_packed_equals_each_segment_alone(groups):
    lengths = [5, 1, 17, 9]
    q, k, v = random_qkv(sum(lengths), groups=groups)
    out = causal_attention_per_segment(q, k, v, cu(lengths))
    start = 0
    for n in lengths:
        seg = slice(start, start + n)
        alone = causal_attention_per_segment(q[seg], k[seg], v[seg], cu([n]))
        torch.testing.assert_close(out[seg], alone, rtol=0, atol=1e-12)
        torch.testing.assert_close(out[seg], naive_causal(q[seg], k[seg], v[seg]), rtol=0, atol=1e-10)
        start += n


def test_padded_layout_matches_unpadded_and_zeroes_padding():
    lengths, padded = [5, 3, 6], [8, 4, 8]
    q, k, v = random_qkv(sum(padded), seed=1)
    real = torch.cat([torch.arange(s, s + n) for s, n in zip(cu(padded)[:-1].tolist(), lengths)])
    out = causal_attention_per_segment(q, k, v, cu(lengths), cu(padded))
    ref = causal_attention_per_segment(q[real], k[real], v[real], cu(lengths))
    torch.testing.assert_close(out[real], ref, rtol=0, atol=0)
    pad = torch.ones(sum(padded), dtype=torch.bool)
    pad[real] = False
    assert (out[pad] == 0).all()


def make_module(**overrides):
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, attention_dropout=0.0, hidden_dropout=0.0,
                               **overrides)
    tp = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    return TorchCoreAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                              attention_type="self", pg_collection=tp)


def test_module_thd_and_sbhd_agree_fp32():
    lengths = [7, 12]
    q, k, v = (x.float() for x in random_qkv(sum(lengths), seed=2))
    attn = make_module()
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu(lengths), cu_seqlens_kv=cu(lengths),
                          cu_seqlens_q_padded=cu(lengths), cu_seqlens_kv_padded=cu(lengths),
                          max_seqlen_q=12, max_seqlen_kv=12)
    out = attn(q, k, v, None, attn_mask_type=AttnMaskType.causal, attention_bias=None, packed_seq_params=psp)
    assert out.shape == (sum(lengths), HEADS * DIM)
    start = 0
    for n in lengths:
        seg = slice(start, start + n)
        # sbhd: [s, b=1, h, d]
        alone = attn(q[seg, None], k[seg, None], v[seg, None], None, attn_mask_type=AttnMaskType.causal,
                     attention_bias=None, packed_seq_params=None)
        assert alone.shape == (n, 1, HEADS * DIM)
        assert (out[seg] - alone[:, 0]).abs().max().item() < 1e-6
        ref = naive_causal(q[seg].double(), k[seg].double(), v[seg].double()).reshape(n, -1)
        assert (out[seg].double() - ref).abs().max().item() < 1e-6
        start += n


def test_module_sbhd_batch_with_padding_mask():
    s, b = 6, 2
    q = torch.randn(s, b, HEADS, DIM)
    k, v = torch.randn(s, b, GROUPS, DIM), torch.randn(s, b, GROUPS, DIM)
    attn = make_module()
    no_mask = attn(q, k, v, None, attn_mask_type=AttnMaskType.causal, attention_bias=None, packed_seq_params=None)
    empty = torch.zeros(b, 1, s, s, dtype=torch.bool)  # Megatron convention: True = masked out
    with_mask = attn(q, k, v, empty, attn_mask_type=AttnMaskType.causal, attention_bias=None, packed_seq_params=None)
    torch.testing.assert_close(no_mask, with_mask)
    for i in range(b):
        ref = naive_causal(q[:, i].double(), k[:, i].double(), v[:, i].double()).reshape(s, -1)
        assert (no_mask[:, i].double() - ref).abs().max().item() < 1e-6


def test_module_refuses_unsupported_settings():
    with pytest.raises(ValueError, match="dropout"):
        TorchCoreAttention(config=TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                                                    attention_dropout=0.1),
                           layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                           pg_collection=SimpleNamespace(tp=SimpleNamespace(size=lambda: 1)))
    with pytest.raises(ValueError, match="causal"):
        config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, attention_dropout=0.0)
        TorchCoreAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.no_mask,
                           attention_type="self", pg_collection=SimpleNamespace(tp=SimpleNamespace(size=lambda: 1)))
