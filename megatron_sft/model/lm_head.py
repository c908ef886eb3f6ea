"""The LM head and cross-entropy at supervised positions only, a chunk of tokens at a time.

Multi-turn SFT data is mostly context (system prompts, user turns, tool outputs): only positions
with a target (``loss_weight > 0``) need logits. ``supervised_head_loss`` is a GPTModel
``output_processor`` (Megatron-Core's hook that replaces the output layer + loss): it gathers the
final hidden states at those positions and runs ``ChunkedVocabParallelCE``, which computes logits,
the vocab-parallel cross-entropy and, in the same pass, the gradients of ``sum(w * ce)`` with
respect to the hidden states and the output weight, ``chunk_tokens`` positions at a time. Nothing
of size ``tokens x vocab`` outlives a chunk: memory is O(chunk x vocab / TP) instead of
O(sequence x vocab / TP), and no logits are computed where there is no target.

The numbers are those of Megatron's own path (``output_layer`` + ``vocab_parallel_cross_entropy``,
whose arithmetic helpers are reused here): same loss, same gradients up to float summation order
(tests compare both, TP=2 and sequence parallel included).

Tensor parallelism: the output weight is split over the vocabulary. Every TP rank holds the same
positions; each computes logits for its vocabulary slice, the max / sum-exp / target logit are
all-reduced, and each rank's gradient for the hidden states is a partial sum over its slice,
summed by the backward of ``copy_to_tensor_model_parallel_region`` (or reduce-scattered back to
the sequence shards under sequence parallelism, by ``gather_from_sequence_parallel_region``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

import megatron_sft.mcore  # noqa: F401  (must precede megatron.core imports)
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as VPCE
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region)
from megatron.core.tensor_parallel.utils import VocabUtility

DEFAULT_CHUNK_TOKENS = 4096
"""Positions per chunk: logits of one chunk take chunk x vocab/TP x 4 bytes (2 GiB at 128K vocab)."""


class ChunkedVocabParallelCE(torch.autograd.Function):
    """``(loss_sum, token_loss) = f(hidden, weight, target, loss_weight)``.

    ``hidden`` ``[n, h]`` (compute dtype), ``weight`` ``[V/TP, h]`` (this rank's vocabulary slice),
    ``target`` ``[n]`` int64 global token ids, ``loss_weight`` ``[n]`` float32.
    ``loss_sum = sum_j loss_weight_j * ce_j`` (0-dim float32, differentiable);
    ``token_loss = ce`` ``[n]`` float32 (for reporting; not differentiable).

    The gradients of ``loss_sum`` are computed in the forward pass, chunk by chunk, and scaled by
    the incoming scalar gradient in the backward pass. Under Megatron's DDP (the weight has a
    fp32 ``main_grad``) the weight gradient is added to ``main_grad`` directly, in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, target, loss_weight, chunk_tokens: int, tp_group, compute_grad: bool):
        n = hidden.shape[0]
        rank, size = (dist.get_rank(tp_group), dist.get_world_size(tp_group)) if tp_group is not None else (0, 1)
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(weight.shape[0], rank, size)
        token_loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if compute_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if compute_grad else None
        for start in range(0, n, chunk_tokens):
            end = min(n, start + chunk_tokens)
            h = hidden[start:end]
            logits, logits_max = VPCE.calculate_logits_max(h @ weight.t())  # fp32 copy of the logits
            _all_reduce(logits_max, dist.ReduceOp.MAX, tp_group, size)
            target_mask, masked_target, predicted, sum_exp, exp_logits = VPCE.calculate_predicted_logits(
                logits, target[start:end], logits_max, vocab_start, vocab_end)
            _all_reduce(predicted, dist.ReduceOp.SUM, tp_group, size)
            _all_reduce(sum_exp, dist.ReduceOp.SUM, tp_group, size)
            softmax, loss = VPCE.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
            token_loss[start:end] = loss
            if not compute_grad:
                continue
            # d(sum w*ce)/d logits = w * (softmax - onehot(target)), as Megatron's backward computes it.
            grad_2d, arange, update, grad_input = VPCE.prepare_gradient_calculation_operands(softmax, target_mask)
            grad_logits = VPCE.calculate_gradients(grad_2d, arange, masked_target, update, grad_input,
                                                   loss_weight[start:end]).to(hidden.dtype)
            grad_hidden[start:end] = grad_logits @ weight
            grad_weight += (grad_logits.t() @ h).float()
        loss_sum = (token_loss * loss_weight).sum()
        ctx.mark_non_differentiable(token_loss)
        ctx.compute_grad = compute_grad
        if compute_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight = weight
        return loss_sum, token_loss

    @staticmethod
    def backward(ctx, grad_loss_sum, _grad_token_loss):
        if not ctx.compute_grad:
            raise RuntimeError("ChunkedVocabParallelCE ran without gradients (compute_grad=False)")
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss_sum.float()
        weight, ctx.weight = ctx.weight, None
        grad_hidden = grad_hidden * scale.to(grad_hidden.dtype)
        main_grad = getattr(weight, "main_grad", None)
        if main_grad is not None:
            # Megatron DDP: accumulate in fp32 where the optimizer reads; the autograd path would
            # round to the parameter dtype first. (Tied embeddings still get their own gradient
            # through autograd, which DDP's hook adds to the same buffer.)
            main_grad.add_(grad_weight.mul_(scale).to(main_grad.dtype))
            return grad_hidden, None, None, None, None, None, None
        return grad_hidden, (grad_weight * scale).to(weight.dtype), None, None, None, None, None


def _all_reduce(tensor: torch.Tensor, op, group, size: int) -> None:
    if size > 1:
        dist.all_reduce(tensor, op=op, group=group)


@dataclass
class SupervisedTargets:
    """What the supervised head needs of a micro-batch: the flat positions (in the ``[b, s]``
    layout of ``labels``) that carry a target, with their labels, weights and sources.

    Build it on the CPU batch (``from_batch``) before moving to the device: finding the
    positions on the GPU would synchronise the host every micro-batch."""

    positions: torch.Tensor
    """int64 ``[n]``: flat indices ``b * s_index`` ... into ``labels.reshape(-1)``."""
    labels: torch.Tensor
    """int64 ``[n]``: target token ids (never IGNORE_INDEX)."""
    loss_weight: torch.Tensor
    """float32 ``[n]``: > 0."""
    source_index: Optional[torch.Tensor]
    """int64 ``[n]`` input-file index per position, or None."""
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    @classmethod
    def from_batch(cls, labels: torch.Tensor, loss_weight: torch.Tensor, source_index: Optional[torch.Tensor],
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> "SupervisedTargets":
        """From a micro-batch's ``labels`` / ``loss_weight`` / ``source_index`` (``[b, s]``)."""
        weight = loss_weight.reshape(-1)
        positions = torch.nonzero(weight > 0).squeeze(1)
        return cls(positions=positions, labels=labels.reshape(-1)[positions].long(),
                   loss_weight=weight[positions].float(),
                   source_index=None if source_index is None else source_index.reshape(-1)[positions],
                   chunk_tokens=chunk_tokens)

    def to(self, device) -> "SupervisedTargets":
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)
        return SupervisedTargets(move(self.positions), move(self.labels), move(self.loss_weight),
                                 move(self.source_index), self.chunk_tokens)


def supervised_head_loss(*, hidden_states: torch.Tensor, output_layer, output_weight: Optional[torch.Tensor],
                         context: SupervisedTargets, config, **unused):
    """GPTModel ``output_processor``: ``(loss_sum, token_loss)`` at ``context``'s positions.

    ``hidden_states``: the final-norm output ``[s_local, b, h]`` (``s_local = s / TP`` under
    sequence parallelism). ``output_weight``: the shared embedding weight when tied, else None
    (the output layer's own weight is used)."""
    weight = output_weight if output_weight is not None else output_layer.weight
    tp_group = output_layer.tp_group if hasattr(output_layer, "tp_group") else None
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    if config.sequence_parallel and tp_size > 1:
        # Backward: reduce-scatter, i.e. sum the TP ranks' partial gradients (each from its
        # vocabulary slice) and hand each rank its own sequence shard.
        hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True,
                                                             group=tp_group)
    elif tp_size > 1:
        hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
    s, b, h = hidden_states.shape
    flat = hidden_states.transpose(0, 1).reshape(b * s, h)  # labels' [b, s] order
    selected = flat.index_select(0, context.positions)
    compute_grad = torch.is_grad_enabled() and (selected.requires_grad or weight.requires_grad)
    return ChunkedVocabParallelCE.apply(selected, weight, context.labels, context.loss_weight,
                                        context.chunk_tokens, tp_group if tp_size > 1 else None, compute_grad)
