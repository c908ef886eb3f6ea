"""The typed configuration tree of megatron-sft, mirrored by YAML and loaded strictly.

Every section is a dataclass; every field has a docstring (it doubles as ``--help``). Megatron's
own ``TransformerConfig`` is never re-declared here: it is built by one pure function
(``megatron_sft.model.transformer_config``) from these sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling, as in HF ``rope_scaling`` (only ``llama3`` is supported)."""

    rope_type: str = "llama3"
    """Scaling type; ``llama3`` is the Llama-3.1 wavelength-dependent scaling."""
    factor: float = 8.0
    """Overall scaling factor."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """Context length the base model was pre-trained at."""


@dataclass
class ModelConfig:
    """A Llama-style decoder: RMSNorm, SwiGLU MLP, RoPE, GQA (Megatron names)."""

    num_layers: int
    """Number of transformer layers."""
    hidden_size: int
    """Model (residual stream) width."""
    ffn_hidden_size: int
    """Width of the SwiGLU MLP (per branch: gate and up are each this wide)."""
    num_attention_heads: int
    """Number of query heads."""
    vocab_size: int
    """Number of embedding rows; must be >= the tokenizer's vocabulary size."""
    num_query_groups: Optional[int] = None
    """Number of key/value heads (GQA); None means equal to num_attention_heads (MHA)."""
    kv_channels: Optional[int] = None
    """Per-head dimension; None means hidden_size // num_attention_heads."""
    max_position_embeddings: int = 4096
    """Longest sequence RoPE is prepared for."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    rope_scaling: Optional[RopeScalingConfig] = None
    """Optional RoPE scaling (Llama-3.1 style)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    add_qkv_bias: bool = False
    """Bias on the query/key/value projections (Qwen2/2.5)."""
    qk_layernorm: bool = False
    """RMSNorm on each query and key head before RoPE (Qwen3)."""
    untie_embeddings_and_output_weights: bool = True
    """False ties the output projection to the input embedding (small Qwen/Llama-3.2 models)."""
    init_method_std: float = 0.02
    """Std of the normal init used when training starts from random weights."""
    attention_backend: str = "auto"
    """Core attention: ``te`` (Transformer Engine, THD, CP), ``torch`` (ours: varlen on CUDA,
    per-segment SDPA on CPU) or ``auto`` (``te`` when importable on a GPU, else ``torch``)."""


@dataclass
class ParallelConfig:
    """Model-parallel layout. Data parallel size is what remains of the world size."""

    tensor_model_parallel_size: int = 1
    """Tensor parallel degree (heads and query groups must divide by it)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages (num_layers must divide by it x virtual size)."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline stage (interleaved 1F1B); None disables."""
    context_parallel_size: int = 1
    """Context parallel degree (TE backend only); each conversation is padded to 2*CP."""
    sequence_parallel: bool = False
    """Shard activations outside attention/MLP across TP ranks (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (GPU only)."""
