"""Micro-batch layout: padding, cu_seqlens, CP split, padded vs unpadded equivalence (exact)."""

import numpy as np
import pytest
import torch

import megatron_sft.mcore  # noqa: F401  (PackedSeqParams lives in megatron.core)
from megatron_sft.data.batches import build_micro_batch, cp_partition_indices, padding_multiples
from megatron_sft.data.labels import IGNORE_INDEX as X


def make_pack(lengths, *, start_token=1, mask=None, sources=None, pack_index=0):
    n = sum(lengths)
    return {
        "tokens": np.arange(start_token, start_token + n, dtype=np.int32),
        "loss_mask": np.ones(n, dtype=np.uint8) if mask is None else np.asarray(mask, dtype=np.uint8),
        "cu_seqlens": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
        "record_index": np.arange(len(lengths)),
        "source_index": np.arange(len(lengths)) if sources is None else np.asarray(sources),
        "pack_index": pack_index,
    }


def test_padding_multiples():
    assert padding_multiples(1, 1, False) == (1, 1)
    assert padding_multiples(1, 4, False) == (1, 1)
    assert padding_multiples(1, 2, True) == (2, 2)
    assert padding_multiples(2, 1, False) == (4, 4)
    assert padding_multiples(2, 2, True) == (4, 4)
    assert padding_multiples(2, 4, True) == (4, 8)  # CP rank holds total/2, must divide by TP 4
    assert padding_multiples(3, 2, True) == (6, 6)


def test_no_padding_single_pack():
    mb = build_micro_batch([make_pack([3, 4])], seq_length=8)
    assert mb.tokens.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert mb.labels.tolist() == [[2, 3, X, 5, 6, 7, X]]
    assert mb.loss_weight.tolist() == [[1, 1, 0, 1, 1, 1, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert mb.source_index.tolist() == [[0, 0, 0, 1, 1, 1, 1]]
    psp = mb.packed_seq_params
    assert psp.qkv_format == "thd"
    assert psp.cu_seqlens_q.tolist() == [0, 3, 7] == psp.cu_seqlens_q_padded.tolist()
    assert psp.max_seqlen_q == psp.max_seqlen_kv == 4
    assert (mb.num_real_tokens, mb.num_targets) == (7, 5)
    assert mb.tokens.dtype == mb.labels.dtype == mb.position_ids.dtype
    assert str(mb.loss_weight.dtype) == "torch.float32"


def test_sequence_parallel_padding_docstring_example():
    mb = build_micro_batch([make_pack([3, 4])], seq_length=8, tensor_model_parallel_size=2, sequence_parallel=True)
    assert mb.tokens.tolist() == [[1, 2, 3, 0, 4, 5, 6, 7]]
    assert mb.labels.tolist() == [[2, 3, X, X, 5, 6, 7, X]]
    assert mb.loss_weight.tolist() == [[1, 1, 0, 0, 1, 1, 1, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert mb.source_index.tolist() == [[0, 0, 0, -1, 1, 1, 1, 1]]
    assert mb.packed_seq_params.cu_seqlens_q.tolist() == [0, 3, 7]
    assert mb.packed_seq_params.cu_seqlens_q_padded.tolist() == [0, 4, 8]


def test_two_packs_concatenated_and_total_padding():
    packs = [make_pack([2, 3], pack_index=7), make_pack([5], start_token=100, sources=[4], pack_index=8)]
    mb = build_micro_batch(packs, seq_length=6, context_parallel_size=2, context_parallel_rank=0, pad_to_length=None)
    # CP=2: conversations padded to multiples of 4: 2->4, 3->4, 5->8; total 16 divides by 4.
    psp = mb.packed_seq_params
    assert psp.cu_seqlens_q.tolist() == [0, 2, 5, 10]
    assert psp.cu_seqlens_q_padded.tolist() == [0, 4, 8, 16]
    assert psp.max_seqlen_q == 8
    assert mb.tokens.shape == (1, 8)  # rank's half
    # pad_to_length: extra padding goes to the last conversation's segment.
    full = build_micro_batch(packs, seq_length=6, pad_to_length=13)
    assert full.packed_seq_params.cu_seqlens_q_padded.tolist() == [0, 2, 5, 13]
    assert full.packed_seq_params.cu_seqlens_q.tolist() == [0, 2, 5, 10]
    assert full.tokens.tolist()[0][-3:] == [0, 0, 0] and full.labels.tolist()[0][-4:] == [X] * 4
    assert full.position_ids.tolist()[0][5:] == list(range(8))
    assert (full.num_real_tokens, full.num_targets) == (10, 1 + 2 + 4)


def test_cp_partition_indices_docstring_example():
    cu = np.array([0, 8, 12])
    assert cp_partition_indices(cu, 12, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert cp_partition_indices(cu, 12, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    with pytest.raises(ValueError, match="multiple of 2"):
        cp_partition_indices(np.array([0, 6]), 6, 2, 0)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_cp_ranks_partition_the_sequence(cp):
    cu = np.array([0, 4 * cp, 6 * cp, 16 * cp]) * 2 // 2
    cu = cu - cu % (2 * cp)
    total = int(cu[-1])
    parts = [cp_partition_indices(cu, total, cp, r) for r in range(cp)]
    assert all(p.size == total // cp for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(total))


def test_cp_slices_are_consistent_with_full_batch():
    packs = [make_pack([5, 7, 2], mask=[0, 1, 1, 0, 1] + [1] * 7 + [0, 1])]
    full = build_micro_batch(packs, seq_length=16, context_parallel_size=2, context_parallel_rank=0)
    # Build again without CP split but with the same padding (CP=2 padding, rank slices by hand).
    ref = build_micro_batch(packs, seq_length=16, pad_to_length=None, tensor_model_parallel_size=4,
                            sequence_parallel=True)
    cu = ref.packed_seq_params.cu_seqlens_q_padded.numpy()
    assert cu.tolist() == full.packed_seq_params.cu_seqlens_q_padded.tolist()
    for r in range(2):
        part = build_micro_batch(packs, seq_length=16, context_parallel_size=2, context_parallel_rank=r)
        keep = cp_partition_indices(cu, int(cu[-1]), 2, r)
        for name in ("tokens", "labels", "loss_weight", "position_ids", "source_index"):
            assert getattr(part, name)[0].tolist() == getattr(ref, name)[0, keep].tolist(), name


def _assembled(packs, **kwargs):
    """The full padded batch; under CP reassembled from every rank's slice."""
    cp = kwargs.get("context_parallel_size", 1)
    if cp == 1:
        return build_micro_batch(packs, **kwargs)
    parts = [build_micro_batch(packs, context_parallel_rank=r, **kwargs) for r in range(cp)]
    cu = parts[0].packed_seq_params.cu_seqlens_q_padded.numpy()
    full = build_micro_batch(packs, **kwargs)  # rank 0, used as a container
    for name in ("tokens", "labels", "loss_weight", "position_ids", "source_index"):
        out = torch.zeros((1, int(cu[-1])), dtype=getattr(full, name).dtype)
        for r, part in enumerate(parts):
            out[0, cp_partition_indices(cu, int(cu[-1]), cp, r)] = getattr(part, name)[0]
        setattr(full, name, out)
    return full


@pytest.mark.parametrize("mode", ["token", "turn", "sequence"])
@pytest.mark.parametrize("layout", [dict(tensor_model_parallel_size=2, sequence_parallel=True), dict(tensor_model_parallel_size=4, sequence_parallel=True),
                                    dict(context_parallel_size=2), dict(context_parallel_size=2,
                                    tensor_model_parallel_size=4, sequence_parallel=True), dict(pad_to_length=64)])
def test_padded_layout_equals_unpadded(mode, layout):
    """Removing the padding of any layout gives back exactly the unpadded batch: the padded path
    must not shift labels, weights or boundaries (the cu_seqlens == cu_seqlens_padded bug)."""
    rng = np.random.default_rng(1)
    lengths = [5, 1, 9, 3]
    packs = [make_pack(lengths, mask=rng.integers(0, 2, sum(lengths))),
             make_pack([6, 2], start_token=50, mask=rng.integers(0, 2, 8))]
    plain = build_micro_batch(packs, seq_length=20, loss_mode=mode)
    padded = _assembled(packs, seq_length=20, loss_mode=mode, **layout)
    psp_p, psp_u = padded.packed_seq_params, plain.packed_seq_params
    assert psp_p.cu_seqlens_q.tolist() == psp_u.cu_seqlens_q.tolist()
    assert psp_p.cu_seqlens_q_padded.tolist() != psp_u.cu_seqlens_q_padded.tolist()
    real = np.concatenate([np.arange(a, a + (e - s)) for a, s, e in zip(
        psp_p.cu_seqlens_q_padded[:-1].tolist(), psp_p.cu_seqlens_q[:-1].tolist(), psp_p.cu_seqlens_q[1:].tolist())])
    for name in ("tokens", "labels", "loss_weight", "position_ids", "source_index"):
        assert getattr(padded, name)[0, real].tolist() == getattr(plain, name)[0].tolist(), name
    pad = np.setdiff1d(np.arange(padded.tokens.shape[1]), real)
    assert (padded.labels[0, pad] == X).all() and (padded.loss_weight[0, pad] == 0).all()
    assert padded.loss_weight.sum().item() == pytest.approx(plain.loss_weight.sum().item())
    assert (padded.num_real_tokens, padded.num_targets) == (plain.num_real_tokens, plain.num_targets)


def test_errors_name_the_pack():
    with pytest.raises(ValueError, match=r"pack 3 .*9 tokens exceed seq_length 8"):
        build_micro_batch([make_pack([4, 5], pack_index=3)], seq_length=8)
    bad = make_pack([4, 5])
    bad["cu_seqlens"] = np.array([0, 4, 8], dtype=np.int32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        build_micro_batch([bad], seq_length=16)
    with pytest.raises(ValueError, match="at least one pack"):
        build_micro_batch([], seq_length=16)
    with pytest.raises(ValueError, match=r"packs 5, 6 need 16 tokens .* more than pad_to_length 12"):
        build_micro_batch([make_pack([3, 3], pack_index=5), make_pack([3, 3], pack_index=6)], seq_length=8,
                          tensor_model_parallel_size=4, sequence_parallel=True, pad_to_length=12)
    with pytest.raises(ValueError, match="multiple of 4"):
        build_micro_batch([make_pack([3])], seq_length=8, tensor_model_parallel_size=4, sequence_parallel=True,
                          pad_to_length=10)
    with pytest.raises(ValueError, match="loss mode"):
        build_micro_batch([make_pack([3])], seq_length=8, loss_mode="turns")


def test_to_device_roundtrip():
    mb = build_micro_batch([make_pack([3, 4])], seq_length=8).to("cpu")
    assert mb.packed_seq_params.cu_seqlens_kv_padded.tolist() == [0, 3, 7]


def test_rank_token_multiple_pads_each_cp_rank():
    """FP8 GEMMs need every rank's token count to divide by 16: the total is padded for it."""
    assert padding_multiples(1, 1, False, 16) == (1, 16)
    assert padding_multiples(2, 2, True, 16) == (4, 32)
    pack = {"tokens": np.arange(1, 20, dtype=np.int32), "loss_mask": np.ones(19, dtype=np.uint8),
            "cu_seqlens": np.array([0, 7, 19], dtype=np.int32), "source_index": np.zeros(2, dtype=np.int64)}
    mb = build_micro_batch([pack], seq_length=64, rank_token_multiple=16)
    assert mb.tokens.shape[1] == 32 and mb.num_real_tokens == 19
    halves = [build_micro_batch([pack], seq_length=64, context_parallel_size=2, context_parallel_rank=r,
                                rank_token_multiple=16) for r in range(2)]
    assert [h.tokens.shape[1] for h in halves] == [16, 16]
