"""Optimizer and learning-rate schedule (megatron.core.optimizer), and one optimizer step.

``start_optimizer_step`` + ``finish_optimizer_step`` do what ``MegatronOptimizer.step`` does, in
the same order, in two halves (the trainer queues the norm behind the backward pass and reads it
later), with two differences: a NaN/inf gradient norm skips the update instead of applying it, and clipping is done
here (``torch._foreach_mul_``) so it runs on any device; Megatron's own clipping asserts CUDA
tensors. The norm covers Megatron's set of gradients, those of ``get_grads_for_grad_norm`` (tensor
parallel duplicates and shared weights counted once), summed over the model-parallel group, but is
accumulated in float64 (``sum_of_squares``) where Megatron uses fp32 per-tensor norms; the same
value is logged and used for clipping (Megatron's own ``clip_grad`` stays 0).
"""

from __future__ import annotations

import functools
import math
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist

import megatron_sft.mcore  # noqa: F401  (must precede megatron.core imports)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_sft.config import SFTConfig


def optimizer_config_from(cfg: SFTConfig) -> OptimizerConfig:
    """Megatron's OptimizerConfig for our training/parallel sections (clipping is ours: 0 here)."""
    t = cfg.training
    return OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        bf16=t.bf16,
        params_dtype=torch.bfloat16 if t.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        clip_grad=0.0,
    )


def build_optimizer(cfg: SFTConfig, model_chunks: List[torch.nn.Module]):
    """Adam(W) over the DDP-wrapped ``model_chunks``; fp32 main params when bf16."""
    return get_megatron_optimizer(optimizer_config_from(cfg), model_chunks)


def build_scheduler(cfg: SFTConfig, optimizer) -> OptimizerParamScheduler:
    """Linear warmup from 0 to ``lr`` over ``lr_warmup_steps``, then ``lr_decay_style`` to
    ``min_lr`` at ``lr_decay_steps`` (default ``train_steps``). Step counts are optimizer steps."""
    t = cfg.training
    decay_steps = t.lr_decay_steps if t.lr_decay_steps is not None else t.train_steps
    # Megatron asserts warmup < decay even for a constant schedule, which never decays.
    decay_steps = max(decay_steps, t.lr_warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.lr_warmup_steps > 0 else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        # On resume: the step count from the checkpoint, the schedule's settings from this run's
        # config (a changed lr or decay takes effect; resume_compat logs it).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def adopt_learning_rates(state_dict, lr: float, min_lr: float) -> None:
    """Set every saved parameter group's ``max_lr``/``min_lr`` (in a loaded optimizer state, at
    any depth) to this run's. Megatron finds the saved groups by these values, so without this a
    resume with another ``training.lr`` cannot load the optimizer moments; with it they load and
    the scheduler applies the new rates. (One lr for all groups: no per-group multipliers here.)"""
    if isinstance(state_dict, dict):
        for group in state_dict.get("param_groups") or []:
            if isinstance(group, dict) and "max_lr" in group:
                group.update(max_lr=lr, min_lr=min_lr)
        for value in state_dict.values():
            adopt_learning_rates(value, lr, min_lr)
    elif isinstance(state_dict, (list, tuple)):
        for value in state_dict:
            adopt_learning_rates(value, lr, min_lr)


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


NORM_CHUNK_ELEMENTS = 1 << 24
"""Elements squared per float64 copy in ``sum_of_squares`` (128 MiB of float64 at a time)."""


def sum_of_squares(grads: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``sum(g**2)`` over all elements of ``grads`` as a float64 scalar on ``device``, every
    element squared and accumulated in float64.

    Why not ``torch._foreach_norm`` in fp32: its rounding depends on the tensor's size and split,
    so the norm of a [32064, 64] output-layer gradient came out 1e-4 low against float64 and
    differed between TP=2 and one process by 3.5e-5 while the gradients agreed to 1e-8. In
    float64 the norm is as layout-independent as the gradients themselves.

    On GPU one compiled reduction per tensor reads it once (no float64 copy); elsewhere float64
    copies of ``NORM_CHUNK_ELEMENTS`` at a time."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    square_sum = _compiled_square_sum() if torch.device(device).type == "cuda" else None
    for grad in grads:
        flat = grad.detach().reshape(-1)
        if square_sum is not None and flat.is_cuda:
            total += square_sum(flat)
            continue
        for start in range(0, flat.numel(), NORM_CHUNK_ELEMENTS):
            part = flat[start:start + NORM_CHUNK_ELEMENTS].to(device=device, dtype=torch.float64)
            total += torch.dot(part, part)
    return total


def _square_sum(flat: torch.Tensor) -> torch.Tensor:
    return flat.double().square().sum()


@functools.lru_cache(maxsize=None)
def _compiled_square_sum():
    return torch.compile(_square_sum, dynamic=True, fullgraph=True)


def squared_grad_norm(optimizer) -> torch.Tensor:
    """The squared global L2 norm of the main gradients (call after ``prepare_grads``), a float64
    tensor on the gradients' device: ``sum_of_squares`` per rank, all-reduced. Queued on the
    device, no host sync: the trainer launches it behind the backward pass and reads it later."""
    inner = _inner_optimizers(optimizer)
    grads = [g for opt in inner for g in opt.get_grads_for_grad_norm()]
    device = grads[0].device if grads else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    total = sum_of_squares(grads, device).reshape(1)
    if dist.is_initialized():
        group = inner[0].get_grad_stats_parallel_group()
        dist.all_reduce(total, group=group)
    return total


def _main_grads(optimizer) -> List[torch.Tensor]:
    grads = []
    for opt in _inner_optimizers(optimizer):
        for param in opt.get_parameters():
            grad = getattr(param, "decoupled_grad", None) if opt.config.use_precision_aware_optimizer else param.grad
            if grad is not None:
                grads.append(grad)
    return grads


class PendingStep(NamedTuple):
    """``start_optimizer_step``'s result: whether ``prepare_grads`` found an inf/NaN (loss
    scaling only) and, if not, the squared gradient norm still on the device."""

    found_inf: bool
    squared_norm: Optional[torch.Tensor]


def start_optimizer_step(optimizer) -> PendingStep:
    """The first half of an optimizer step: unscale/copy the gradients and queue the norm's
    reduction (and its all-reduce) without waiting for it. Called right after the backward pass,
    so that the GPU runs the reduction while the host does other work (the loss sums, the next
    batch)."""
    if optimizer.prepare_grads():
        return PendingStep(True, None)
    return PendingStep(False, squared_grad_norm(optimizer))


def finish_optimizer_step(optimizer, pending: PendingStep, clip_grad: float) -> tuple[bool, float]:
    """The second half: read the norm, clip to ``clip_grad`` (0 = never), update.

    Returns ``(applied, grad_norm)``; ``applied`` is False (nothing changed) when the norm is not
    finite or a loss scaler found an overflow."""
    if pending.found_inf:
        return False, float("nan")
    norm = float(pending.squared_norm.sqrt().item())
    if not math.isfinite(norm):
        return False, norm
    if clip_grad > 0 and norm > clip_grad:
        grads = _main_grads(optimizer)
        if grads:
            torch._foreach_mul_(grads, clip_grad / (norm + 1.0e-6))
    applied = optimizer.step_with_ready_grads()
    return bool(applied), norm


def prepare_for_loading(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam state tensors so that a checkpoint can be
    loaded into them (its ``state_dict`` needs them; torch Adam creates them at the first step).
    The dummy zero-gradient step changes nothing that the load does not overwrite."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in _inner_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()
