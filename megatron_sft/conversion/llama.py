"""Llama 2/3.x (incl. Llama-3.1 ``llama3`` RoPE scaling) and Mistral (same tensors, another config).

Also home of the pieces Qwen2/Qwen3 extend: the decoder key map and the shared config fields.

HF key                                          Megatron key (canonical, TE names)
model.embed_tokens.weight                       embedding.word_embeddings.weight
model.layers.{}.input_layernorm.weight          decoder.layers.{}.self_attention.linear_qkv.layer_norm_weight
model.layers.{}.self_attn.{q,k,v}_proj.weight   decoder.layers.{}.self_attention.linear_qkv.weight   (QKV)
model.layers.{}.self_attn.o_proj.weight         decoder.layers.{}.self_attention.linear_proj.weight
model.layers.{}.post_attention_layernorm.weight decoder.layers.{}.mlp.linear_fc1.layer_norm_weight
model.layers.{}.mlp.{gate,up}_proj.weight       decoder.layers.{}.mlp.linear_fc1.weight              (GATE_UP)
model.layers.{}.mlp.down_proj.weight            decoder.layers.{}.mlp.linear_fc2.weight
model.norm.weight                               decoder.final_layernorm.weight
lm_head.weight                                  output_layer.weight   (absent when embeddings are tied)
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

from megatron_sft.config import ModelConfig, RopeScalingConfig
from megatron_sft.conversion.common import (
    GATE_UP,
    QKV,
    Architecture,
    ConversionError,
    KeyRule,
    raise_problems,
    register,
    require,
)

HF_LAYER = "model.layers.{}."
MG_LAYER = "decoder.layers.{}."


def decoder_key_rules(cfg: ModelConfig) -> List[KeyRule]:
    """The Llama decoder key map; optional tensors follow the config."""
    attn, mlp = HF_LAYER + "self_attn.", HF_LAYER + "mlp."
    rules = [
        KeyRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        KeyRule(MG_LAYER + "self_attention.linear_qkv.layer_norm_weight", (HF_LAYER + "input_layernorm.weight",)),
        KeyRule(
            MG_LAYER + "self_attention.linear_qkv.weight",
            (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
            QKV,
        ),
    ]
    if cfg.add_qkv_bias:
        rules.append(
            KeyRule(
                MG_LAYER + "self_attention.linear_qkv.bias",
                (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
                QKV,
            )
        )
    if cfg.qk_layernorm:
        rules += [
            KeyRule(MG_LAYER + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",)),
            KeyRule(MG_LAYER + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",)),
        ]
    rules += [
        KeyRule(MG_LAYER + "self_attention.linear_proj.weight", (attn + "o_proj.weight",)),
        KeyRule(MG_LAYER + "mlp.linear_fc1.layer_norm_weight", (HF_LAYER + "post_attention_layernorm.weight",)),
        KeyRule(MG_LAYER + "mlp.linear_fc1.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight"), GATE_UP),
        KeyRule(MG_LAYER + "mlp.linear_fc2.weight", (mlp + "down_proj.weight",)),
        KeyRule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    ]
    if cfg.untie_embeddings_and_output_weights:
        rules.append(KeyRule("output_layer.weight", ("lm_head.weight",)))
    return rules


# Tied models may still ship lm_head.weight (a copy of the embedding); RoPE buffers are derived.
IGNORED_HF_KEYS = ("lm_head.weight", "model.layers.{}.self_attn.rotary_emb.inv_freq")


# ---------------------------------------------------------------------------------------------
# Config: HF config.json dict <-> ModelConfig


def parse_rope(hf: Mapping, problems: List[str]) -> Tuple[float, Optional[RopeScalingConfig]]:
    """(rope_theta, scaling) from either the transformers<5 fields (``rope_theta``,
    ``rope_scaling``) or the transformers>=5 ``rope_parameters`` dict."""
    params = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", params.pop("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or params or None
    if not scaling:
        return float(theta), None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        problems.append(f"rope scaling type {rope_type!r} is not supported (only 'llama3')")
        return float(theta), None
    return float(theta), RopeScalingConfig(
        rope_type="llama3",
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def common_model_config(hf: Mapping, problems: List[str], **overrides) -> Optional[ModelConfig]:
    """The fields every supported family shares; ``overrides`` set the family-specific flags.
    None when required fields are missing (``problems`` says which; the caller raises)."""
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if key not in hf:
            problems.append(f"config.json has no {key!r}")
    require(hf, problems, "hidden_act", "silu", "Megatron SwiGLU uses SiLU")
    require(hf, problems, "mlp_bias", False, "no MLP biases in the Megatron spec")
    if problems:
        return None  # reported by the caller
    heads = hf["num_attention_heads"]
    theta, scaling = parse_rope(hf, problems)
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        vocab_size=hf["vocab_size"],
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rotary_base=theta,
        rope_scaling=scaling,
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=hf.get("initializer_range", 0.02),
        **overrides,
    )


def common_hf_config(cfg: ModelConfig, architecture: str, model_type: str) -> Dict:
    """The HF config.json fields shared by the supported families. RoPE is written both ways:
    ``rope_theta``/``rope_scaling`` (read by transformers 4 and 5) and ``rope_parameters`` (5)."""
    scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        scaling = {
            "rope_type": s.rope_type,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rotary_base},
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "vocab_size": cfg.vocab_size,
        "initializer_range": cfg.init_method_std,
    }


def check_exportable(cfg: ModelConfig, model_type: str, *, qkv_bias: bool, qk_norm: bool) -> None:
    """Refuse to export a ModelConfig the HF family cannot represent."""
    problems = []
    if cfg.add_qkv_bias != qkv_bias:
        problems.append(f"add_qkv_bias={cfg.add_qkv_bias} but {model_type} has add_qkv_bias={qkv_bias}")
    if cfg.qk_layernorm != qk_norm:
        problems.append(f"qk_layernorm={cfg.qk_layernorm} but {model_type} has qk_layernorm={qk_norm}")
    raise_problems(model_type, problems)


def _llama_model_config(hf: Mapping) -> ModelConfig:
    problems: List[str] = []
    require(hf, problems, "attention_bias", False, "Megatron's add_qkv_bias has no output-projection bias")
    cfg = common_model_config(hf, problems)
    raise_problems("llama", problems)
    return cfg


def _llama_hf_config(cfg: ModelConfig) -> Dict:
    check_exportable(cfg, "llama", qkv_bias=False, qk_norm=False)
    return {**common_hf_config(cfg, "LlamaForCausalLM", "llama"), "attention_bias": False, "mlp_bias": False}


def _mistral_model_config(hf: Mapping) -> ModelConfig:
    problems: List[str] = []
    if hf.get("sliding_window") is not None:
        problems.append(
            f"sliding_window={hf['sliding_window']} (sliding-window attention) is not supported; "
            "Mistral v0.2+ configs set it to null"
        )
    cfg = common_model_config(hf, problems)
    raise_problems("mistral", problems)
    if cfg.rope_scaling is not None:
        raise ConversionError("mistral: rope scaling is not supported")
    return cfg


def _mistral_hf_config(cfg: ModelConfig) -> Dict:
    check_exportable(cfg, "mistral", qkv_bias=False, qk_norm=False)
    if cfg.rope_scaling is not None:
        raise ConversionError("mistral: rope scaling cannot be expressed in a Mistral config")
    return {**common_hf_config(cfg, "MistralForCausalLM", "mistral"), "sliding_window": None}


LLAMA = register(
    Architecture(
        model_type="llama",
        hf_architecture="LlamaForCausalLM",
        to_model_config=_llama_model_config,
        to_hf_config=_llama_hf_config,
        key_rules=decoder_key_rules,
        ignored_hf_keys=IGNORED_HF_KEYS,
    )
)

MISTRAL = register(
    Architecture(
        model_type="mistral",
        hf_architecture="MistralForCausalLM",
        to_model_config=_mistral_model_config,
        to_hf_config=_mistral_hf_config,
        key_rules=decoder_key_rules,
        ignored_hf_keys=IGNORED_HF_KEYS,
    )
)
