"""Tiny random HF models of each supported family, built offline (tests and smoke runs).

2 layers, hidden 64, 4 heads, 2 KV heads (GQA), vocab 512: small enough for a 2-core CPU, shaped
so every transform is exercised (heads per group 2, biases, QK-norm, tied embeddings).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_hf_config(family: str, **overrides):
    """The HF config of a tiny model; ``family`` in FAMILIES. Norm weights are randomised by
    :func:`build_tiny_hf_model` so a swapped norm cannot go unnoticed."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if family == "llama":  # Llama-3.1 style: llama3 RoPE scaling, large theta
        kwargs = dict(rope_theta=10000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}, head_dim=16)
        cls = LlamaConfig
    elif family == "mistral":
        kwargs, cls = dict(sliding_window=None, head_dim=16, rope_theta=1000000.0), MistralConfig
    elif family == "qwen2":  # small Qwen2.5: QKV bias, tied embeddings
        kwargs, cls = dict(tie_word_embeddings=True, rope_theta=1000000.0), Qwen2Config
    elif family == "qwen3":  # head_dim independent of hidden_size / heads
        kwargs, cls = dict(head_dim=32, rope_theta=1000000.0, tie_word_embeddings=False), Qwen3Config
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    kwargs = {**TINY, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, **kwargs, **overrides}
    return cls(**kwargs)


def build_tiny_hf_model(family: str, out_dir: Optional[str] = None, *, dtype=torch.float32,
                        seed: int = 0, tokenizer_dir: Optional[str] = None, max_shard_size: str = "5GB",
                        **overrides):
    """A randomly initialised ``AutoModelForCausalLM`` (all weights, incl. norms and biases,
    random); saved with its tokenizer and a generation_config to ``out_dir`` when given
    (``max_shard_size`` small, e.g. "100KB", writes several shards and an index)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.manual_seed(seed)
    config = tiny_hf_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model = model.to(dtype).eval()
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
        GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=16).save_pretrained(out_dir)
        if tokenizer_dir is not None:
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return model
