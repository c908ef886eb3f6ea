"""Qwen3 (dense): the Llama key map plus per-head RMSNorm on queries and keys (QK-norm, applied
before RoPE), an explicit ``head_dim`` (128 even where hidden_size / heads differs), no biases.

HF key                                          Megatron key
model.layers.{}.self_attn.q_norm.weight         decoder.layers.{}.self_attention.q_layernorm.weight
model.layers.{}.self_attn.k_norm.weight         decoder.layers.{}.self_attention.k_layernorm.weight
(everything else as in llama.py)
"""

from __future__ import annotations

from typing import Dict, List, Mapping

from megatron_sft.config import ModelConfig
from megatron_sft.conversion.common import Architecture, raise_problems, register, require
from megatron_sft.conversion.llama import (
    IGNORED_HF_KEYS,
    check_exportable,
    common_hf_config,
    common_model_config,
    decoder_key_rules,
)


def _model_config(hf: Mapping) -> ModelConfig:
    problems: List[str] = []
    require(hf, problems, "attention_bias", False, "Megatron's add_qkv_bias has no output-projection bias")
    require(hf, problems, "use_sliding_window", False, "sliding-window attention is not supported")
    cfg = common_model_config(hf, problems, qk_layernorm=True)
    raise_problems("qwen3", problems)
    return cfg


def _hf_config(cfg: ModelConfig) -> Dict:
    check_exportable(cfg, "qwen3", qkv_bias=False, qk_norm=True)
    out = common_hf_config(cfg, "Qwen3ForCausalLM", "qwen3")
    return {**out, "attention_bias": False, "use_sliding_window": False, "sliding_window": None}


QWEN3 = register(
    Architecture(
        model_type="qwen3",
        hf_architecture="Qwen3ForCausalLM",
        to_model_config=_model_config,
        to_hf_config=_hf_config,
        key_rules=decoder_key_rules,  # reads cfg.qk_layernorm
        ignored_hf_keys=IGNORED_HF_KEYS,
    )
)
