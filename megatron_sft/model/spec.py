"""The one place the attention backend is chosen and the layer spec is built.

``te``: Megatron's Transformer Engine spec (fused norm+linear, TE THD attention, context
parallel). ``torch``: Megatron's local spec with our ``TorchCoreAttention`` and ``RMSNorm``
(the stock torch norm refuses sequence parallel). Both give the same parameter tensors; the
checkpoint key names are reconciled in ``build.canonical_sharded_state_dict``.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import megatron_sft.mcore  # noqa: F401
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_sft.config import ModelConfig
from megatron_sft.config import resolve_attention_backend as config_backend
from megatron_sft.model.attention import TorchCoreAttention



def _te_importable() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install (ABI mismatch) counts as absent
        return False
    return True


def resolve_attention_backend(name: str) -> str:
    """``config.resolve_attention_backend`` on this machine (CUDA present, TE importable)."""
    return config_backend(name, has_cuda=torch.cuda.is_available(),
                          has_te=torch.cuda.is_available() and _te_importable())


class RMSNorm(torch.nn.Module):
    """RMSNorm usable under sequence parallel (Megatron ``LayerNormBuilder`` signature).

    ``y = x / sqrt(mean(x^2) + eps) * weight``, computed in fp32 and cast back. The weight is
    marked ``sequence_parallel`` so Megatron all-reduces its gradient over TP ranks (each rank
    normalises only its slice of the sequence)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm built for normalization={config.normalization!r}")
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device="cpu" if config.use_cpu_initialization
                       or not torch.cuda.is_available() else torch.cuda.current_device())
        )
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def get_layer_spec(model_cfg: ModelConfig, backend: str, te_activation: bool = False) -> ModuleSpec:
    """Transformer-layer ``ModuleSpec`` for a resolved backend (``te`` | ``torch``);
    ``te_activation``: TE's activation op in the MLP (te only; Megatron's ``use_te_activation_func``)."""
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model_cfg.qk_layernorm,
                                                          use_te_activation_func=te_activation)
    if te_activation:
        raise ValueError("te_activation needs the te backend")
    if backend != "torch":
        raise ValueError(f"backend must be resolved to te or torch first, got {backend!r}")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=model_cfg.qk_layernorm, normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = TorchCoreAttention
    if model_cfg.qk_layernorm:
        attention.q_layernorm = RMSNorm
        attention.k_layernorm = RMSNorm
    return spec


def get_block_spec(model_cfg: ModelConfig, backend: str, config, vp_stage=None):
    """What GPTModel takes as ``transformer_layer_spec``: the layer spec for ``te`` (Megatron adds
    TE's final norm), a block spec with our ``RMSNorm`` as final norm for ``torch`` (Megatron's
    default there is the stock torch norm, which refuses sequence parallel)."""
    layer = get_layer_spec(model_cfg, backend, te_activation=getattr(config, "use_te_activation_func", False))
    if backend == "te":
        return layer
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=RMSNorm)
