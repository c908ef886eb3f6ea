"""The trainer's view of the model package: build the chunks with the training options set on
Megatron's TransformerConfig, wrap them for training (bf16 module, Megatron DDP with fp32 grad
buffers), and the checkpoint keys of the canonical state dict.

Keys: ``model`` for one chunk, ``model0``, ``model1``, ... under virtual pipeline parallelism.
"""

from __future__ import annotations

from typing import List

import torch

import megatron_sft.mcore  # noqa: F401  (must precede megatron.core imports)
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import Float16Module

from megatron_sft.config import SFTConfig
from megatron_sft.errors import InputError
from megatron_sft.model import build as model_build
from megatron_sft.model.spec import resolve_attention_backend


def build_model(cfg: SFTConfig) -> List[torch.nn.Module]:
    """DDP-wrapped model chunks (one per virtual pipeline stage) on this rank's device."""
    t = cfg.training
    full = t.recompute_granularity == "full"
    backend = resolve_attention_backend(cfg.model.attention_backend)
    transformer_config = model_build.transformer_config_from(
        cfg.model, cfg.parallel,
        params_dtype=torch.bfloat16 if t.bf16 else torch.float32,
        bf16=t.bf16,
        recompute_granularity=None if t.recompute_granularity == "none" else t.recompute_granularity,
        recompute_method=t.recompute_method if full else None,
        recompute_num_layers=t.recompute_num_layers if full else None,
        overrides={**speed_overrides(cfg, backend), **recompute_overrides(cfg)},
    )
    # Layer-seeded init: the same initial weights in every parallel layout (CPU initialisation).
    chunks = model_build.build_model_chunks(cfg.model, cfg.parallel, backend=backend,
                                            transformer_config=transformer_config, init_seed=t.seed)
    if t.recompute_granularity == "selective" and t.recompute_num_layers is not None:
        for chunk in chunks:
            model_build.limit_selective_recompute(chunk, t.recompute_num_layers)
    if t.bf16:
        chunks = [Float16Module(transformer_config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def speed_overrides(cfg: SFTConfig, backend: str) -> dict:
    """TransformerConfig fields for ``training.fused_kernels`` and ``training.fp8`` (GPU only).

    Fused RoPE and the fused wgrad accumulation are Transformer Engine kernels, so they need the
    te backend; fused SwiGLU and cross-entropy are Megatron's own (torch.jit / Triton-free), or
    TE's SwiGLU with ``training.activation_kernel: te``.
    ``cross_entropy_loss_fusion`` also selects the compiled chunk kernels of the supervised head
    (``model.lm_head.chunk_kernels``)."""
    t, out = cfg.training, {}
    if not torch.cuda.is_available():
        return out
    if t.fused_kernels:
        out.update(bias_activation_fusion=True, cross_entropy_loss_fusion=True)
        if backend == "te":
            out.update(apply_rope_fusion=True, gradient_accumulation_fusion=True)
            if t.activation_kernel == "te":
                out.update(bias_activation_fusion=False, use_te_activation_func=True)
    if t.fp8:
        out.update(fp8="hybrid", fp8_recipe=t.fp8)
    return out


def recompute_overrides(cfg: SFTConfig) -> dict:
    """TransformerConfig ``recompute_modules`` for selective recompute (a copy: Megatron appends)."""
    t = cfg.training
    return {} if t.recompute_modules is None else {"recompute_modules": list(t.recompute_modules)}


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _keys(num_chunks: int) -> List[str]:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state_dict(chunks) -> dict:
    """``{"model": ...}`` or ``{"model0": ..., "model1": ...}``: the canonical sharded state dicts."""
    return {key: model_build.canonical_sharded_state_dict(unwrap(chunk))
            for key, chunk in zip(_keys(len(chunks)), chunks)}


def load_model_state(chunks, loaded: dict) -> None:
    """Copy loaded tensors (from ``dist_checkpointing.load``) into the chunks; every parameter
    must be present (TE's ``_extra_state`` FP8 metadata excepted)."""
    for key, chunk in zip(_keys(len(chunks)), chunks):
        result = unwrap(chunk).load_state_dict(loaded[key], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise InputError(f"checkpoint does not match the model: missing {missing[:5]}, "
                             f"unexpected {list(result.unexpected_keys)[:5]}")
