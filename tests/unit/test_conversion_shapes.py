"""Full-size key maps on the meta device (no memory): Llama-3.1-70B and Qwen2.5-72B.

The HF tensors come from the real transformers model class built on ``meta`` from the published
config values (written out here); the expected Megatron shapes are written from the formulas.
"""

from __future__ import annotations

import pytest
import torch

from megatron_sft.config import RopeScalingConfig
from megatron_sft.conversion.common import architecture_for, convert_hf_to_megatron, convert_megatron_to_hf

LLAMA_31_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
    "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
}
QWEN25_72B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8192,
    "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 131072,
    "max_window_layers": 80, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
}


def _expected_megatron_shapes(hidden, ffn, layers, heads, groups, head_dim, vocab, qkv_bias):
    qkv_rows = (heads + 2 * groups) * head_dim
    shapes = {"embedding.word_embeddings.weight": (vocab, hidden), "decoder.final_layernorm.weight": (hidden,),
              "output_layer.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"decoder.layers.{i}."
        shapes.update({
            p + "self_attention.linear_qkv.layer_norm_weight": (hidden,),
            p + "self_attention.linear_qkv.weight": (qkv_rows, hidden),
            p + "self_attention.linear_proj.weight": (hidden, heads * head_dim),
            p + "mlp.linear_fc1.layer_norm_weight": (hidden,),
            p + "mlp.linear_fc1.weight": (2 * ffn, hidden),
            p + "mlp.linear_fc2.weight": (hidden, ffn),
        })
        if qkv_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = (qkv_rows,)
    return shapes


def _meta_hf_state_dict(hf_config: dict) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.state_dict()


@pytest.mark.parametrize("hf_config,qkv_bias", [(LLAMA_31_70B, False), (QWEN25_72B, True)], ids=["llama31-70b", "qwen25-72b"])
def test_full_size_shapes_on_meta(hf_config, qkv_bias):
    arch = architecture_for(hf_config)
    cfg = arch.to_model_config(hf_config)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_query_groups, cfg.kv_channels) == (
        80, 8192, hf_config["intermediate_size"], 8, 128)
    assert cfg.add_qkv_bias == qkv_bias and cfg.untie_embeddings_and_output_weights
    if hf_config is LLAMA_31_70B:
        assert cfg.rope_scaling == RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 8192) and cfg.rotary_base == 500000.0

    hf = _meta_hf_state_dict(hf_config)
    rules = arch.rules(cfg)
    assert {k for r in rules for k in r.hf} == set(hf)  # the key map covers every HF tensor exactly
    megatron = dict(convert_hf_to_megatron(hf.__getitem__, rules, cfg))
    expected = _expected_megatron_shapes(8192, hf_config["intermediate_size"], 80, 64, 8, 128,
                                         hf_config["vocab_size"], qkv_bias)
    assert {k: tuple(v.shape) for k, v in megatron.items()} == expected
    assert all(v.is_meta and v.dtype == torch.bfloat16 for v in megatron.values())

    back = dict(convert_megatron_to_hf(megatron.__getitem__, rules, cfg))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in hf.items()}
