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
whose arithmetic is followed step by step here): same loss, same gradients up to float summation
order (tests compare both, TP=2 and sequence parallel included). On GPU with
``training.fused_kernels`` the per-chunk arithmetic is compiled (``chunk_kernels``).

Tensor parallelism: the output weight is split over the vocabulary. Every TP rank holds the same
positions; each computes logits for its vocabulary slice, the max / sum-exp / target logit are
all-reduced, and each rank's gradient for the hidden states is a partial sum over its slice,
summed by the backward of ``copy_to_tensor_model_parallel_region`` (or reduce-scattered back to
the sequence shards under sequence parallelism, by ``gather_from_sequence_parallel_region``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

import megatron_sft.mcore  # noqa: F401  (must precede megatron.core imports)
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region)
from megatron.core.tensor_parallel.utils import VocabUtility

from megatron_sft.data.batches import to_device

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
    def forward(ctx, hidden, weight, target, loss_weight, chunk_tokens: int, tp_group, compute_grad: bool,
                fused: bool = False):
        n = hidden.shape[0]
        rank, size = (dist.get_rank(tp_group), dist.get_world_size(tp_group)) if tp_group is not None else (0, 1)
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(weight.shape[0], rank, size)
        kernels = chunk_kernels(fused and hidden.is_cuda)
        token_loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if compute_grad else None
        grad_weight = None
        for start in range(0, n, chunk_tokens):
            end = min(n, start + chunk_tokens)
            h = hidden[start:end]
            logits = h @ weight.t()  # compute dtype; every pass below reads it and works in fp32
            local_target = target[start:end] - vocab_start
            in_range = (local_target >= 0) & (local_target < logits.shape[1])
            local_target = torch.where(in_range, local_target, torch.zeros_like(local_target))
            logits_max = kernels.row_max(logits)
            _all_reduce(logits_max, dist.ReduceOp.MAX, tp_group, size)
            sum_exp, predicted = kernels.exp_sums(logits, logits_max, local_target, in_range)
            _all_reduce(predicted, dist.ReduceOp.SUM, tp_group, size)
            _all_reduce(sum_exp, dist.ReduceOp.SUM, tp_group, size)
            token_loss[start:end] = torch.log(sum_exp) - predicted
            if not compute_grad:
                continue
            # d(sum w*ce)/d logits = w * (softmax - onehot(target)), as Megatron's backward computes it.
            grad_logits = kernels.logit_grad(logits, logits_max, sum_exp, local_target, in_range,
                                             loss_weight[start:end])
            del logits
            grad_hidden[start:end] = grad_logits @ weight
            grad_weight = kernels.accumulate_mm(grad_weight, grad_logits.t(), h)
        if compute_grad and grad_weight is None:  # no positions
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
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
            return grad_hidden, None, None, None, None, None, None, None
        return grad_hidden, (grad_weight * scale).to(weight.dtype), None, None, None, None, None, None


# The per-chunk arithmetic, in the order of Megatron's VocabParallelCrossEntropy (fp32 logits
# minus their max, exp, sum; loss = log(sum_exp) - target logit; gradient softmax - onehot, times
# the weight). Written as three functions over the compute-dtype logits so that, on GPU, each can
# be one compiled kernel: the eager version materialises ~6 fp32 copies of the chunk's logits
# (cast, shift, exp, softmax, gradient), the compiled one reads the bf16 logits three times and
# writes the bf16 gradient once. Between them sit the tensor-parallel all-reduces.

def _row_max(logits: torch.Tensor) -> torch.Tensor:
    """``[n, v]`` -> fp32 ``[n]``: this rank's max logit per position."""
    return logits.float().amax(dim=1)


def _exp_sums(logits, logits_max, local_target, in_range):
    """``(sum_j exp(logit_j - max), logit_target - max)`` fp32 ``[n]`` over this rank's vocabulary
    slice; the target term is 0 where the target lies in another rank's slice."""
    sum_exp = (logits.float() - logits_max.unsqueeze(1)).exp().sum(dim=1)
    picked = logits.gather(1, local_target.unsqueeze(1)).squeeze(1).float() - logits_max
    return sum_exp, torch.where(in_range, picked, torch.zeros_like(picked))


def _logit_grad(logits, logits_max, sum_exp, local_target, in_range, loss_weight):
    """``w * (softmax - onehot(target))`` in the logits' dtype, ``[n, v]``."""
    softmax = (logits.float() - logits_max.unsqueeze(1)).exp() / sum_exp.unsqueeze(1)
    columns = torch.arange(logits.shape[1], device=logits.device)
    onehot = (columns.unsqueeze(0) == local_target.unsqueeze(1)) & in_range.unsqueeze(1)
    return ((softmax - onehot.float()) * loss_weight.unsqueeze(1)).to(logits.dtype)


def _accumulate_mm(acc: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` in fp32 (``acc`` None: ``a @ b``), the product rounded to ``a``'s dtype first."""
    product = (a @ b).float()
    return product if acc is None else acc.add_(product)


def _accumulate_mm_fp32(acc: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` with the product accumulated in fp32 inside the GEMM (cuBLAS ``out_dtype``:
    no rounded copy of the ``[v, h]`` product and no separate fp32 add)."""
    if a.dtype == torch.float32:
        return _accumulate_mm(acc, a, b)
    if acc is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.addmm(acc, a, b, out_dtype=torch.float32)


class ChunkKernels(NamedTuple):
    row_max: Callable
    exp_sums: Callable
    logit_grad: Callable
    accumulate_mm: Callable


@functools.lru_cache(maxsize=None)
def chunk_kernels(fused: bool) -> ChunkKernels:
    """The chunk arithmetic: eager (CPU, or ``fused`` off), or compiled by ``torch.compile`` with
    the weight gradient accumulated in fp32 by the GEMM (GPU with ``training.fused_kernels``).
    Chunk lengths vary (the last chunk of a micro-batch), so the kernels are compiled for dynamic
    shapes once."""
    if not fused:
        return ChunkKernels(_row_max, _exp_sums, _logit_grad, _accumulate_mm)
    compile_dynamic = functools.partial(torch.compile, dynamic=True, fullgraph=True)
    return ChunkKernels(compile_dynamic(_row_max), compile_dynamic(_exp_sums), compile_dynamic(_logit_grad),
                        _accumulate_mm_fp32)


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
        return SupervisedTargets(to_device(self.positions, device), to_device(self.labels, device),
                                 to_device(self.loss_weight, device), to_device(self.source_index, device),
                                 self.chunk_tokens)


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
    fused = bool(getattr(config, "cross_entropy_loss_fusion", False))
    return ChunkedVocabParallelCE.apply(selected, weight, context.labels, context.loss_weight,
                                        context.chunk_tokens, tp_group if tp_size > 1 else None, compute_grad,
                                        fused)
