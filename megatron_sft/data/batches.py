"""Micro-batches from packs: one THD (packed) sequence per micro-batch, ready for GPTModel.

A *pack* is a dict as returned by ``PackedDataset(prefix)[i]``: ``tokens`` int32 ``[n]``,
``loss_mask`` uint8 ``[n]``, ``cu_seqlens`` int32 ``[k+1]`` (real lengths of its k conversations),
``record_index`` / ``source_index`` ``[k]`` (provenance per conversation); optional ``pack_index``
(used in error messages).

Layout. Each conversation is padded at its end to a multiple of ``conversation_multiple`` (2*CP
when CP > 1, and TP when sequence parallel: the lcm), the ``micro_batch_size`` packs are
concatenated into one sequence ``[1, T]``, and the last conversation takes extra padding so that
``T`` divides by ``total_multiple`` (every CP rank then holds T/CP tokens, a multiple of TP under
sequence parallel). Worked example, TP=2 with SP, one pack with real lengths [3, 4]::

    real cu_seqlens         [0, 3, 7]        -> PackedSeqParams.cu_seqlens_q / _kv
    padded lengths          [4, 4]
    padded cu_seqlens       [0, 4, 8]        -> PackedSeqParams.cu_seqlens_q_padded / _kv_padded
    tokens                  a0 a1 a2 P | b0 b1 b2 b3            (P = pad, token id 0)
    labels                  a1 a2 -- -- | b1 b2 b3 --            (if every token is supervised)

Attention and RoPE see segment i at ``[cu_padded[i], cu_padded[i] + real_len_i)``; pads carry no
target (``labels == IGNORE_INDEX``, weight 0), so they never reach the loss.

Context parallel (``cp_size > 1``): the per-document load-balanced split of Transformer Engine's
``thd_get_partitioned_indices``: every padded conversation is cut into 2*CP equal chunks and rank r
keeps chunks r and 2*CP-1-r (see ``cp_partition_indices``). The returned tensors are the rank's
slice; ``packed_seq_params`` keeps the full-sequence cu_seqlens, as TE expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from megatron_sft.data.labels import IGNORE_INDEX, loss_weights, shift_labels

PAD_TOKEN_ID = 0
"""Token id written at padding positions (never a target, never attended to by real tokens)."""


@dataclass
class MicroBatch:
    """One micro-batch as a single packed (THD) sequence, possibly the CP rank's slice of it.

    Tensors are ``[1, T_local]`` with ``T_local = T / cp_size``; ``source_index`` is -1 at
    padding. Counts are over the whole micro-batch (before the CP split), for reporting."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_weight: torch.Tensor
    position_ids: torch.Tensor
    source_index: torch.Tensor
    packed_seq_params: object  # megatron.core.packed_seq_params.PackedSeqParams
    num_real_tokens: int
    num_targets: int

    def model_labels(self) -> torch.Tensor:
        """Labels safe to give the model's own cross-entropy: IGNORE_INDEX replaced by token 0
        (those positions have weight 0, so their loss never counts)."""
        return self.labels.clamp(min=0)

    def to(self, device) -> "MicroBatch":
        """Copy of this batch on ``device`` (cu_seqlens included). To a GPU the copies go through
        pinned memory, so they are asynchronous: a copy from pageable memory waits for the GPU to
        finish all queued work (the previous micro-batch's backward), leaving it idle while the
        host then queues the next forward."""
        psp = self.packed_seq_params
        moved = {
            name: to_device(getattr(psp, name), device)
            for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded")
        }
        new_psp = type(psp)(
            qkv_format=psp.qkv_format, max_seqlen_q=psp.max_seqlen_q, max_seqlen_kv=psp.max_seqlen_kv, **moved
        )
        tensors = {
            name: to_device(getattr(self, name), device)
            for name in ("tokens", "labels", "loss_weight", "position_ids", "source_index")
        }
        return MicroBatch(
            **tensors, packed_seq_params=new_psp, num_real_tokens=self.num_real_tokens, num_targets=self.num_targets
        )


def to_device(tensor: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """``tensor`` on ``device`` without blocking the host: a CPU tensor bound for a GPU is pinned
    first (torch's caching host allocator keeps it alive until the copy is done)."""
    if tensor is None:
        return None
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def padding_multiples(
    context_parallel_size: int = 1, tensor_model_parallel_size: int = 1, sequence_parallel: bool = False,
    rank_token_multiple: int = 1,
) -> tuple[int, int]:
    """``(conversation_multiple, total_multiple)`` for a parallel layout (module docstring).
    ``rank_token_multiple``: each CP rank's token count must also divide by it (FP8 GEMMs need 16)."""
    cp2 = 2 * context_parallel_size if context_parallel_size > 1 else 1
    tp = tensor_model_parallel_size if sequence_parallel else 1
    conv = math.lcm(cp2, tp)
    # Trailing padding is added to the last conversation, so the total stays a multiple of
    # ``conv``; each CP rank holds total / CP tokens, which sequence parallel splits across TP.
    return conv, math.lcm(conv, context_parallel_size * tp, context_parallel_size * rank_token_multiple)


def cp_partition_indices(cu_seqlens_padded: np.ndarray, total_length: int, cp_size: int, cp_rank: int) -> np.ndarray:
    """Token indices kept by ``cp_rank``: for each segment (padded length L, a multiple of
    2*cp_size) chunks ``cp_rank`` and ``2*cp_size-1-cp_rank`` of size ``L / (2*cp_size)``, segments in
    order. Equivalent to TE's ``tex.thd_get_partitioned_indices``.

    Example: cu_seqlens_padded [0, 8, 12], cp_size 2 -> chunks of 2 and 1;
    rank 0 keeps [0 1 | 6 7 | 8 | 11], rank 1 keeps [2 3 | 4 5 | 9 | 10]."""
    cu = np.asarray(cu_seqlens_padded, dtype=np.int64)
    if cu[-1] != total_length:
        raise ValueError(f"cu_seqlens_padded ends at {cu[-1]}, expected total length {total_length}")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} outside [0, {cp_size})")
    lengths = np.diff(cu)
    if np.any(lengths % (2 * cp_size)):
        raise ValueError(f"every padded segment must be a multiple of 2*cp_size={2 * cp_size}: {lengths.tolist()}")
    parts = []
    for start, length in zip(cu[:-1], lengths):
        chunk = length // (2 * cp_size)
        parts.append(np.arange(start + cp_rank * chunk, start + (cp_rank + 1) * chunk))
        second = 2 * cp_size - 1 - cp_rank
        parts.append(np.arange(start + second * chunk, start + (second + 1) * chunk))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _check_pack(pack: Mapping, position: int, seq_length: int) -> tuple[np.ndarray, ...]:
    tokens = np.asarray(pack["tokens"])
    loss_mask = np.asarray(pack["loss_mask"])
    cu = np.asarray(pack["cu_seqlens"], dtype=np.int64)
    source = np.asarray(pack.get("source_index", np.zeros(cu.size - 1)), dtype=np.int64)
    name = f"pack {pack.get('pack_index', '?')} (position {position} in the micro-batch)"
    if tokens.shape != loss_mask.shape or tokens.ndim != 1:
        raise ValueError(f"{name}: tokens {tokens.shape} and loss_mask {loss_mask.shape} differ")
    if cu.size < 2 or cu[0] != 0 or cu[-1] != tokens.size or np.any(np.diff(cu) <= 0):
        raise ValueError(f"{name}: cu_seqlens {cu.tolist()} must rise strictly from 0 to {tokens.size}")
    if source.size != cu.size - 1:
        raise ValueError(f"{name}: {source.size} source_index values for {cu.size - 1} conversations")
    if tokens.size > seq_length:
        raise ValueError(
            f"{name}: {tokens.size} tokens exceed seq_length {seq_length}; the data was packed for a "
            f"longer seq_length (check the dataset's .meta.json) or is corrupt"
        )
    return tokens, loss_mask, cu, source


def build_micro_batch(
    packs: Sequence[Mapping],
    *,
    seq_length: int,
    loss_mode: str = "token",
    tensor_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    context_parallel_size: int = 1,
    context_parallel_rank: int = 0,
    pad_to_length: Optional[int] = None,
    rank_token_multiple: int = 1,
) -> MicroBatch:
    """Concatenate ``packs`` (``micro_batch_size`` of them) into one THD micro-batch.

    ``seq_length``: the most real tokens a pack may hold (ValueError naming the pack otherwise).
    ``loss_mode``: ``token`` | ``turn`` | ``sequence`` (``megatron_sft.data.labels``).
    ``pad_to_length``: fixed total length (static shapes; required with interleaved pipelines):
    a multiple of the layout's total multiple, ValueError when the padded packs do not fit.
    ``rank_token_multiple``: pad so each CP rank's token count divides by it (FP8: 16).
    Returns the ``context_parallel_rank``'s slice when CP > 1."""
    if not packs:
        raise ValueError("a micro-batch needs at least one pack")
    conv_multiple, total_multiple = padding_multiples(
        context_parallel_size, tensor_model_parallel_size, sequence_parallel, rank_token_multiple
    )
    pieces, real_lengths, padded_lengths, num_targets = _conversation_pieces(packs, seq_length, loss_mode,
                                                                              conv_multiple)
    target_total = _target_total(sum(padded_lengths), total_multiple, pad_to_length, packs)
    _pad_tail(pieces, padded_lengths, target_total - sum(padded_lengths))

    cu_real = np.concatenate([[0], np.cumsum(real_lengths)]).astype(np.int32)
    cu_padded = np.concatenate([[0], np.cumsum(padded_lengths)]).astype(np.int32)
    arrays = {key: np.concatenate(value) for key, value in pieces.items()}
    if context_parallel_size > 1:
        keep = cp_partition_indices(cu_padded, target_total, context_parallel_size, context_parallel_rank)
        arrays = {key: value[keep] for key, value in arrays.items()}

    def row(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values)).unsqueeze(0)

    return MicroBatch(
        tokens=row(arrays["tokens"]),
        labels=row(arrays["labels"]),
        loss_weight=row(arrays["weight"].astype(np.float32)),
        position_ids=row(arrays["position"]),
        source_index=row(arrays["source"]),
        packed_seq_params=_thd_params(cu_real, cu_padded, int(max(padded_lengths))),
        num_real_tokens=int(cu_real[-1]),
        num_targets=num_targets,
    )


def _conversation_pieces(packs: Sequence[Mapping], seq_length: int, loss_mode: str, conv_multiple: int):
    """Per conversation, its arrays padded to ``conv_multiple``: (pieces by name, real lengths,
    padded lengths, number of targets). Padding: PAD tokens, no target, weight 0, source -1,
    positions continuing the conversation's."""
    pieces = {"tokens": [], "labels": [], "weight": [], "position": [], "source": []}
    real_lengths, padded_lengths, num_targets = [], [], 0
    for position, pack in enumerate(packs):
        tokens, loss_mask, cu, source = _check_pack(pack, position, seq_length)
        labels = shift_labels(tokens, loss_mask, cu)
        weights = loss_weights(loss_mask, cu, loss_mode)
        num_targets += int((labels != IGNORE_INDEX).sum())
        for i, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
            n = int(end - start)
            n_pad = -n % conv_multiple
            pad = np.zeros(n_pad, dtype=np.int64)
            pieces["tokens"] += [tokens[start:end].astype(np.int64), pad + PAD_TOKEN_ID]
            pieces["labels"] += [labels[start:end], pad + IGNORE_INDEX]
            pieces["weight"] += [weights[start:end], pad.astype(np.float32)]
            pieces["position"] += [np.arange(n + n_pad, dtype=np.int64)]
            pieces["source"] += [np.full(n, source[i], dtype=np.int64), pad - 1]
            real_lengths.append(n)
            padded_lengths.append(n + n_pad)
    return pieces, real_lengths, padded_lengths, num_targets


def _target_total(total: int, total_multiple: int, pad_to_length: Optional[int], packs: Sequence[Mapping]) -> int:
    """The micro-batch's padded length: ``total`` rounded up to ``total_multiple``, or the fixed
    ``pad_to_length`` (ValueError when it is not a multiple or the packs do not fit)."""
    if pad_to_length is None:
        return -(-total // total_multiple) * total_multiple
    if pad_to_length % total_multiple:
        raise ValueError(f"pad_to_length {pad_to_length} must be a multiple of {total_multiple} for this layout")
    if total > pad_to_length:
        names = [str(p.get("pack_index", "?")) for p in packs]
        raise ValueError(
            f"packs {', '.join(names)} need {total} tokens after per-conversation padding, more than "
            f"pad_to_length {pad_to_length}; raise pad_to_length"
        )
    return pad_to_length


def _pad_tail(pieces: dict, padded_lengths: list, extra: int) -> None:
    """Append ``extra`` padding positions; they belong to the last conversation's padded segment."""
    if not extra:
        return
    last = padded_lengths[-1]
    pieces["tokens"].append(np.full(extra, PAD_TOKEN_ID, dtype=np.int64))
    pieces["labels"].append(np.full(extra, IGNORE_INDEX, dtype=np.int64))
    pieces["weight"].append(np.zeros(extra, dtype=np.float32))
    pieces["position"].append(np.arange(last, last + extra, dtype=np.int64))
    pieces["source"].append(np.full(extra, -1, dtype=np.int64))
    padded_lengths[-1] += extra


def _thd_params(cu_real: np.ndarray, cu_padded: np.ndarray, max_seqlen: int):
    """Megatron's PackedSeqParams for THD attention: real and padded cumulative lengths."""
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=torch.from_numpy(cu_real),
        cu_seqlens_kv=torch.from_numpy(cu_real.copy()),
        cu_seqlens_q_padded=torch.from_numpy(cu_padded),
        cu_seqlens_kv_padded=torch.from_numpy(cu_padded.copy()),
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )
