"""HF config.json <-> ModelConfig for each family, the registry, and unsupported settings."""

from __future__ import annotations

import pytest

from megatron_sft.config import ModelConfig, RopeScalingConfig
from megatron_sft.conversion.common import (
    UnsupportedArchitectureError,
    architecture_by_name,
    architecture_for,
    supported_model_types,
)
from megatron_sft.testing.tiny_models import FAMILIES, tiny_hf_config


def test_registry_by_model_type_and_by_architectures():
    assert supported_model_types() == ["llama", "mistral", "qwen2", "qwen3"]
    for family in FAMILIES:
        assert architecture_for({"model_type": family}).model_type == family
    assert architecture_for({"model_type": "custom", "architectures": ["Qwen2ForCausalLM"]}).model_type == "qwen2"


@pytest.mark.parametrize("hf", [{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
                                {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, {}])
def test_unsupported_architecture_names_the_supported_ones(hf):
    with pytest.raises(UnsupportedArchitectureError, match=r"unsupported architecture.*llama \(LlamaForCausalLM\)"):
        architecture_for(hf)
    with pytest.raises(UnsupportedArchitectureError, match="supported: llama, mistral, qwen2, qwen3"):
        architecture_by_name("gpt2")


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip_through_transformers(family):
    """HF config -> ModelConfig -> HF config.json -> the transformers class: same model."""
    from transformers import AutoConfig

    source = tiny_hf_config(family)
    arch = architecture_for(source.to_dict())
    cfg = arch.to_model_config(source.to_dict())
    assert cfg == arch.to_model_config(arch.to_hf_config(cfg))
    rebuilt = AutoConfig.for_model(**{k: v for k, v in arch.to_hf_config(cfg).items() if k != "model_type"},
                                   model_type=family).to_dict()
    expected = source.to_dict()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
                "vocab_size", "max_position_embeddings", "hidden_act", "attention_bias", "sliding_window"):
        assert rebuilt.get(key) == expected.get(key), key


def test_llama31_fields_and_both_rope_formats():
    v4 = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 131072, "rope_theta": 500000.0,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}}
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": 500000.0}
    llama = architecture_by_name("llama")
    cfg = llama.to_model_config(v4)
    assert cfg == llama.to_model_config(v5)
    assert cfg == ModelConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, vocab_size=512,
        num_query_groups=2, kv_channels=16, max_position_embeddings=131072, rotary_base=500000.0,
        rope_scaling=RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 8192), norm_epsilon=1e-5)


def test_family_flags():
    qwen2 = architecture_by_name("qwen2").to_model_config(tiny_hf_config("qwen2").to_dict())
    assert qwen2.add_qkv_bias and not qwen2.qk_layernorm and not qwen2.untie_embeddings_and_output_weights
    qwen3 = architecture_by_name("qwen3").to_model_config(tiny_hf_config("qwen3").to_dict())
    assert qwen3.qk_layernorm and not qwen3.add_qkv_bias and qwen3.kv_channels == 32  # != 64 / 4


def test_all_unsupported_settings_reported_at_once():
    hf = {**tiny_hf_config("llama").to_dict(), "hidden_act": "gelu", "attention_bias": True, "mlp_bias": True}
    with pytest.raises(UnsupportedArchitectureError) as err:
        architecture_by_name("llama").to_model_config(hf)
    for text in ("hidden_act='gelu'", "attention_bias=True", "mlp_bias=True"):
        assert text in str(err.value)


@pytest.mark.parametrize("family,change,message", [
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "rope scaling type 'yarn'"),
    ("mistral", {"sliding_window": 4096}, "sliding_window=4096"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=True"),
    ("qwen3", {"attention_bias": True}, "attention_bias=True"),
    ("llama", {"num_hidden_layers": None}, "num_hidden_layers"),
])
def test_unsupported_settings(family, change, message):
    hf = {**tiny_hf_config(family).to_dict(), **change}
    hf = {k: v for k, v in hf.items() if v is not None}
    with pytest.raises(UnsupportedArchitectureError, match=message):
        architecture_by_name(family).to_model_config(hf)


def test_export_refuses_configs_the_family_cannot_express():
    cfg = architecture_by_name("qwen3").to_model_config(tiny_hf_config("qwen3").to_dict())
    with pytest.raises(UnsupportedArchitectureError, match="qk_layernorm=True but llama"):
        architecture_by_name("llama").to_hf_config(cfg)
    qwen2 = architecture_by_name("qwen2").to_model_config(tiny_hf_config("qwen2").to_dict())
    qwen2.kv_channels = 32
    with pytest.raises(UnsupportedArchitectureError, match="head_dim"):
        architecture_by_name("qwen2").to_hf_config(qwen2)
