"""Qwen2 / Qwen2.5: the Llama key map plus biases on q/k/v (fused like the weights, per query
group), often tied embeddings on the small sizes (0.5B-3B: no ``output_layer.weight``).

HF key                                          Megatron key
model.layers.{}.self_attn.{q,k,v}_proj.bias     decoder.layers.{}.self_attention.linear_qkv.bias  (QKV)
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
    require(hf, problems, "use_sliding_window", False, "sliding-window attention is not supported")
    cfg = common_model_config(hf, problems, add_qkv_bias=True)
    raise_problems("qwen2", problems)
    return cfg


def _hf_config(cfg: ModelConfig) -> Dict:
    check_exportable(cfg, "qwen2", qkv_bias=True, qk_norm=False)
    problems = []
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        problems.append("Qwen2 configs derive head_dim = hidden_size / num_attention_heads; kv_channels differs")
    raise_problems("qwen2", problems)
    out = common_hf_config(cfg, "Qwen2ForCausalLM", "qwen2")
    del out["head_dim"]
    return {**out, "use_sliding_window": False, "sliding_window": None}


QWEN2 = register(
    Architecture(
        model_type="qwen2",
        hf_architecture="Qwen2ForCausalLM",
        to_model_config=_model_config,
        to_hf_config=_hf_config,
        key_rules=decoder_key_rules,  # reads cfg.add_qkv_bias
        ignored_hf_keys=IGNORED_HF_KEYS,
    )
)
