"""The SFT loss: weighted sums for Megatron's per-token normalisation, plus what we report.

With ``TransformerConfig.calculate_per_token_loss=True`` Megatron's schedules take from the loss
function ``(loss_sum, count, report)``, back-propagate ``loss_sum`` unscaled, add up ``count`` over
micro-batches, all-reduce it over data (and context) parallel ranks and divide the gradients by
it (``finalize_model_grads``). So the gradient is that of

    loss = sum over the global batch of w_j * ce_j  /  sum over the global batch of w_j

and this module returns exactly those two sums. Weights ``w`` come from
``megatron_sft.data.labels.loss_weights`` (token: 1 per target; turn: 1 per assistant turn;
sequence: 1 per conversation), so ``sum(w)`` is a whole number in every mode: the number of
supervised tokens, turns or conversations. Megatron keeps the count in an int tensor, hence the
rounding below (exact, up to float error in ``1/len(run)`` sums).

The report holds detached copies (the schedules may divide the returned loss in place):
``[loss_sum, weight_sum, per-source loss sums..., per-source weight sums...]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import torch

import torch.distributed as dist


def weighted_loss_sums(
    per_token_loss: torch.Tensor,
    loss_weight: torch.Tensor,
    source_index: Optional[torch.Tensor],
    num_sources: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums of a micro-batch.

    Args:
        per_token_loss: float ``[b, s]`` cross-entropy of every position (garbage allowed where
            the weight is 0: padding, ignored labels).
        loss_weight: float ``[b, s]`` weight of every position (0 where there is no target).
        source_index: int ``[b, s]`` input-file index of the conversation at each position, or None.
        num_sources: number of input files named in the dataset meta (>= 1).

    Returns:
        ``loss_sum`` (0-dim, differentiable), ``weight_sum`` (0-dim float) and the detached
        ``[2, num_sources]`` per-source (loss, weight) sums.
    """
    loss = per_token_loss.float().reshape(-1)
    weight = loss_weight.float().reshape(-1).to(loss.device)
    if loss.shape != weight.shape:
        raise ValueError(f"loss has {loss.numel()} positions but loss_weight {weight.numel()}")
    # where(), not multiply: a NaN/inf loss at a weight-0 position (padding) must not leak in.
    weighted = torch.where(weight > 0, loss * weight, torch.zeros_like(loss))
    loss_sum = weighted.sum()
    weight_sum = weight.sum()
    per_source = torch.zeros(2, max(num_sources, 1), dtype=torch.float64, device=loss.device)
    if source_index is not None:
        src = source_index.reshape(-1).to(loss.device).long().clamp_(0, per_source.shape[1] - 1)
        per_source[0].index_add_(0, src, weighted.detach().double())
        per_source[1].index_add_(0, src, weight.double())
    else:
        per_source[0, 0] = loss_sum.detach().double()
        per_source[1, 0] = weight_sum.double()
    return loss_sum, weight_sum, per_source


def sft_loss_func(
    output_tensor: torch.Tensor,
    *,
    loss_weight: torch.Tensor,
    source_index: Optional[torch.Tensor],
    num_sources: int,
    cp_group: Optional[dist.ProcessGroup] = None,
):
    """Megatron loss function (bind the keywords with ``functools.partial``).

    ``output_tensor``: the model's per-token loss ``[b, s]`` (``training.lm_head: full``; weights
    and sources ``[b, s]`` too), or ``(loss_sum, token_loss)`` from the supervised head
    (``megatron_sft.model.lm_head``: ``loss_sum`` differentiable, ``token_loss`` ``[n]`` at the
    target positions only; weights and sources ``[n]`` for the same positions).

    Returns ``(loss_sum, count, {"sums": report})`` where ``count`` is the int32 whole-number
    weight of this micro-batch. Under context parallelism a turn may be split across CP ranks, so
    the count is summed over the CP group and returned by CP rank 0 only (Megatron all-reduces
    the counts over DP x CP; the loss sums stay local to each CP shard, as their gradients do).
    """
    head_loss_sum = None
    if isinstance(output_tensor, (tuple, list)):
        head_loss_sum, output_tensor = output_tensor
    loss_sum, weight_sum, per_source = weighted_loss_sums(output_tensor, loss_weight, source_index, num_sources)
    if head_loss_sum is not None:
        loss_sum = head_loss_sum  # the same number, carrying the head's gradient
    count = weight_sum.detach().clone()
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        dist.all_reduce(count, group=cp_group)
        if dist.get_rank(cp_group) != 0:
            count.zero_()
    count = torch.round(count).to(torch.int32)
    report = torch.cat([
        torch.stack([loss_sum.detach().double(), count.double()]),
        per_source.reshape(-1),
    ])
    return loss_sum, count, {"sums": report}


def report_width(num_sources: int) -> int:
    """Length of a report vector: loss and weight sums, then per-source loss and weight sums."""
    return 2 + 2 * max(num_sources, 1)


def make_loss_func(loss_weight, source_index, num_sources: int, cp_group=None) -> Callable:
    return partial(sft_loss_func, loss_weight=loss_weight, source_index=source_index,
                   num_sources=num_sources, cp_group=cp_group)


@dataclass
class LossReport:
    """Global loss of one step or evaluation, from the summed reports of every micro-batch."""

    loss: float
    """sum(w * ce) / sum(w): the value whose gradient was taken."""
    weight_sum: float
    """sum(w): supervised tokens (token mode), turns (turn) or conversations (sequence)."""
    per_source: dict
    """input name -> loss over that source's positions (sources without targets are omitted)."""
    num_targets: Optional[int] = None
    """Supervised target tokens behind the loss, where counted (evaluation)."""


def summarize(report: torch.Tensor, source_names: Sequence[str]) -> LossReport:
    """Turn a globally summed report vector (see ``sft_loss_func``) into losses."""
    report = report.double().cpu()
    loss_sum, weight_sum = float(report[0]), float(report[1])
    per_source = report[2:].reshape(2, -1)
    names = list(source_names) or ["all"]
    sums: dict = {}  # by name: several datasets may share an input name
    for i, name in enumerate(names[: per_source.shape[1]]):
        loss_i, weight_i = sums.get(name, (0.0, 0.0))
        sums[name] = (loss_i + float(per_source[0, i]), weight_i + float(per_source[1, i]))
    by_source = {name: s / w for name, (s, w) in sums.items() if w > 0}
    loss = loss_sum / weight_sum if weight_sum > 0 else float("nan")
    return LossReport(loss=loss, weight_sum=weight_sum, per_source=by_source)
