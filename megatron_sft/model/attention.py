"""Core attention for the ``torch`` backend: causal, per packed segment, GQA.

Plugged into Megatron's local layer spec as
``spec.submodules.self_attention.submodules.core_attention`` (``megatron_sft.model.spec``). It
receives q/k/v after the QKV projection and RoPE, sharded over TP (``h`` = query heads on this
rank, ``g`` = query groups on this rank, ``d`` = head dim):

* THD (``packed_seq_params.qkv_format == "thd"``): q ``[t, h, d]``, k/v ``[t, g, d]`` -> ``[t, h*d]``.
  Segment i occupies ``[cu_seqlens_q_padded[i], cu_seqlens_q_padded[i] + real_len_i)`` with
  ``real_len_i = cu_seqlens_q[i+1] - cu_seqlens_q[i]``; tokens after it (padding) get zeros.
* SBHD (no packing): q ``[s, b, h, d]``, k/v ``[s, b, g, d]`` -> ``[s, b, h*d]``, causal.

On CUDA, THD uses ``torch.nn.attention.varlen.varlen_attn`` (flash attention) over the padded
segments: causal masking keeps every real token blind to its segment's trailing padding, so this
equals attention over the real lengths. On CPU it runs causal SDPA segment by segment.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F

import megatron_sft.mcore  # noqa: F401
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
except ImportError:  # pragma: no cover - depends on the torch build
    _varlen_attn, _VARLEN_PARAMS = None, set()


def _expand_groups(x: torch.Tensor, num_heads: int, head_dim_axis: int) -> torch.Tensor:
    """Repeat each of the g key/value heads for its h/g query heads (Megatron's grouping:
    query head j uses group j // (h / g))."""
    groups = x.shape[head_dim_axis]
    if groups == num_heads:
        return x
    return x.repeat_interleave(num_heads // groups, dim=head_dim_axis)


def causal_attention_per_segment(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_padded: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Reference THD attention: q ``[t, h, d]``, k/v ``[t, g, d]`` -> ``[t, h, d]``; causal SDPA
    on each segment's real tokens, zeros at padding. ``cu_seqlens`` real lengths (cumulative),
    ``cu_seqlens_padded`` segment offsets in ``q`` (None: no padding)."""
    starts = (cu_seqlens_padded if cu_seqlens_padded is not None else cu_seqlens)[:-1].tolist()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    num_heads = q.shape[1]
    out = torch.zeros_like(q)
    for start, length in zip(starts, lengths):
        if length == 0:
            continue
        seg = slice(start, start + length)
        # [len, heads, d] -> [heads, len, d] for SDPA
        qs = q[seg].transpose(0, 1)
        ks = _expand_groups(k[seg], num_heads, 1).transpose(0, 1)
        vs = _expand_groups(v[seg], num_heads, 1).transpose(0, 1)
        out[seg] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


def _varlen_causal(q, k, v, cu_seqlens, max_seqlen, scale):
    kwargs = {"scale": scale}
    if "window_size" in _VARLEN_PARAMS:  # torch >= 2.12: (-1, 0) = causal
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if "enable_gqa" in _VARLEN_PARAMS:
        kwargs["enable_gqa"] = k.shape[1] != q.shape[1]
    else:
        k, v = _expand_groups(k, q.shape[1], 1), _expand_groups(v, q.shape[1], 1)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return _varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


class TorchCoreAttention(MegatronModule):
    """Megatron ``CoreAttentionInterface`` on plain torch (see module docstring). Causal only;
    no dropout (SFT), no context parallel, no sliding window."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("the torch attention backend has no context parallel: use attention_backend te")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"the torch attention backend is causal only, got {attn_mask_type}")
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
            raise ValueError("the torch attention backend has no attention dropout; set it to 0")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_groups = divide(config.num_query_groups, tp_size)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("the torch attention backend does not take an attention bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_thd(query, key, value, packed_seq_params)
        return self._forward_sbhd(query, key, value, attention_mask)

    def _forward_thd(self, q, k, v, psp) -> torch.Tensor:
        t = q.shape[0]
        assert q.shape[1] == self.num_heads and k.shape[1] == self.num_groups, (q.shape, k.shape)
        if q.is_cuda and _varlen_attn is not None:
            cu = psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else psp.cu_seqlens_q
            max_seqlen = int(psp.max_seqlen_q)
            out = _varlen_causal(q, k, v, cu, max_seqlen, self.softmax_scale)
        else:
            out = causal_attention_per_segment(
                q, k, v, psp.cu_seqlens_q, psp.cu_seqlens_q_padded, scale=self.softmax_scale
            )
        return out.reshape(t, -1)

    def _forward_sbhd(self, q, k, v, attention_mask) -> torch.Tensor:
        s, b, h, d = q.shape
        # [s, b, h, d] -> [b, h, s, d]
        qb = q.permute(1, 2, 0, 3)
        kb = _expand_groups(k, h, 2).permute(1, 2, 0, 3)
        vb = _expand_groups(v, h, 2).permute(1, 2, 0, 3)
        if attention_mask is None:
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=self.softmax_scale)
        else:
            # Megatron's mask convention: True = masked out; combined with causal.
            causal = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
            keep = ~(attention_mask.bool() | causal)
            out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=keep, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
