"""Model FLOPs of a training step from the real documents, and MFU.

Dense FLOPs scale with real (non-pad) tokens; attention FLOPs with each conversation's own causal
square, since packed THD attention never looks across conversations. A pack of 8 conversations of
512 tokens costs 8 x 512^2 / 2 score pairs, not 4096^2 / 2.

Per layer and token (forward, multiply-add = 2 FLOPs), for hidden h, heads n, kv groups g, head dim
d, MLP width f (SwiGLU: gate, up, down):
    qkv 2h(nd + 2gd) + out 2ndh + mlp 6hf
plus the output layer 2hV per token, and per conversation of length L per layer
    scores + weighted values: 2 x 2 n d x L(L+1)/2
Training = forward + backward = 3x forward. Recompute is not counted (model FLOPs, not hardware).
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

# Dense peak TFLOP/s per GPU by (name fragment, dtype); MFU is reported only for known devices.
PEAK_TFLOPS = {
    ("H200", "bf16"): 989.0, ("H100", "bf16"): 989.0, ("A100", "bf16"): 312.0,
    ("H200", "fp32"): 494.0, ("H100", "fp32"): 494.0, ("A100", "fp32"): 156.0,  # TF32 tensor cores
}


def causal_pairs(lengths: Iterable[int]) -> int:
    """Sum over conversations of L(L+1)/2 (query-key pairs under a causal mask)."""
    lengths = np.asarray(list(lengths), dtype=np.int64)
    return int((lengths * (lengths + 1) // 2).sum())


def step_flops(model_cfg, num_tokens: int, num_causal_pairs: int) -> float:
    """Training FLOPs (forward + backward) of ``num_tokens`` real tokens whose conversations hold
    ``num_causal_pairs`` causal query-key pairs in total. ``model_cfg`` is a ModelConfig."""
    h, n = model_cfg.hidden_size, model_cfg.num_attention_heads
    g, d = model_cfg.query_groups, model_cfg.head_dim
    dense_per_token = 2 * h * (n * d + 2 * g * d) + 2 * n * d * h + 6 * h * model_cfg.ffn_hidden_size
    forward = model_cfg.num_layers * (num_tokens * dense_per_token + 4 * n * d * num_causal_pairs)
    forward += num_tokens * 2 * h * model_cfg.vocab_size
    return 3.0 * forward


def peak_tflops(device_name: Optional[str], bf16: bool) -> Optional[float]:
    """Dense peak of one device, or None when unknown (CPU, unlisted GPUs)."""
    if not device_name:
        return None
    dtype = "bf16" if bf16 else "fp32"
    for (fragment, kind), value in PEAK_TFLOPS.items():
        if fragment in device_name and kind == dtype:
            return value
    return None
