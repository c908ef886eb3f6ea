"""The conversion engine: declarative key maps, small pure transforms, the architecture registry.

An architecture module (llama.py, qwen2.py, qwen3.py) declares
  * its HF ``config.json`` <-> :class:`~megatron_sft.config.ModelConfig` mapping, and
  * a list of :class:`KeyRule` s: one Megatron key, the HF key(s) it is made of, and a transform.
``{}`` in a key stands for the layer index, e.g.
``KeyRule("decoder.layers.{}.mlp.linear_fc1.weight",
          ("model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.up_proj.weight"), GATE_UP)``.

Megatron keys are the canonical checkpoint keys (TE spec names, global layer numbers): the
pre-attention / pre-MLP norms are ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``
so one checkpoint loads into both the ``te`` and the ``torch`` backend. Every Megatron tensor here
is the *global* (TP=1) tensor; Megatron's sharded state dict slices it per TP rank when loading.

Transforms are pure functions of tensors and the ModelConfig; they run unchanged on the ``meta``
device, which is how full-size shapes are checked without allocating memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_sft.config import ModelConfig
from megatron_sft.errors import SFTError

LAYER = "{}"


class ConversionError(SFTError, ValueError):
    """A user-facing conversion problem (bad input, unsupported model, missing file)."""


class UnsupportedArchitectureError(ConversionError):
    """The HF model's architecture has no key map here."""


# ---------------------------------------------------------------------------------------------
# Shape helpers


# ---------------------------------------------------------------------------------------------
# Transforms. ``to_megatron`` takes the HF tensors in rule order and returns one tensor;
# ``to_hf`` takes that tensor and returns the HF tensors in rule order.


@dataclass(frozen=True)
class Transform:
    name: str
    to_megatron: Callable[[Sequence[torch.Tensor], ModelConfig], torch.Tensor]
    to_hf: Callable[[torch.Tensor, ModelConfig], List[torch.Tensor]]


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Fuse HF q/k/v projections (weights ``[out, hidden]`` or biases ``[out]``) into Megatron's
    ``linear_qkv`` layout, grouped per query group.

    Worked example: 4 heads, 2 groups (2 heads per group), head dim d. HF rows are
    q = [q0 q1 q2 q3], k = [k0 k1], v = [v0 v1] (each block d rows). Megatron's rows are
    [q0 q1 k0 v0 | q2 q3 k1 v1]: group g holds its query heads, then its key head, then its
    value head. A TP rank owns whole groups, so its slice of this tensor is contiguous.
    """
    groups, d = cfg.query_groups, cfg.head_dim
    heads_per_group = cfg.num_attention_heads // groups
    trailing = q.shape[1:]
    _check_rows(q, cfg.num_attention_heads * d, "q")
    _check_rows(k, groups * d, "k")
    _check_rows(v, groups * d, "v")
    fused = torch.cat(
        [
            q.reshape(groups, heads_per_group * d, *trailing),
            k.reshape(groups, d, *trailing),
            v.reshape(groups, d, *trailing),
        ],
        dim=1,
    )
    return fused.reshape(groups * (heads_per_group + 2) * d, *trailing)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> List[torch.Tensor]:
    """Inverse of :func:`interleave_qkv`: returns ``[q, k, v]`` in HF layout (contiguous)."""
    groups, d = cfg.query_groups, cfg.head_dim
    heads_per_group = cfg.num_attention_heads // groups
    trailing = qkv.shape[1:]
    _check_rows(qkv, groups * (heads_per_group + 2) * d, "linear_qkv")
    per_group = qkv.reshape(groups, (heads_per_group + 2) * d, *trailing)
    q, k, v = torch.split(per_group, [heads_per_group * d, d, d], dim=1)
    return [
        q.reshape(cfg.num_attention_heads * d, *trailing).contiguous(),
        k.reshape(groups * d, *trailing).contiguous(),
        v.reshape(groups * d, *trailing).contiguous(),
    ]


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Megatron's SwiGLU ``linear_fc1`` is ``[gate; up]`` along the output rows (its sharded state
    dict stores the TP shards of each half separately, so this global layout is TP-invariant)."""
    _check_rows(gate, cfg.ffn_hidden_size, "gate")
    _check_rows(up, cfg.ffn_hidden_size, "up")
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor, cfg: ModelConfig) -> List[torch.Tensor]:
    """Inverse of :func:`fuse_gate_up`: returns ``[gate, up]``."""
    _check_rows(fc1, 2 * cfg.ffn_hidden_size, "linear_fc1")
    gate, up = torch.split(fc1, cfg.ffn_hidden_size, dim=0)
    return [gate.contiguous(), up.contiguous()]


def _check_rows(t: torch.Tensor, rows: int, what: str) -> None:
    if t.shape[0] != rows:
        raise ConversionError(f"{what}: expected {rows} rows from the model config, got shape {tuple(t.shape)}")


IDENTITY = Transform("identity", lambda ts, cfg: ts[0], lambda t, cfg: [t])
QKV = Transform("qkv", lambda ts, cfg: interleave_qkv(*ts, cfg), split_qkv)
GATE_UP = Transform("gate_up", lambda ts, cfg: fuse_gate_up(*ts, cfg), split_gate_up)


# ---------------------------------------------------------------------------------------------
# Key maps


@dataclass(frozen=True)
class KeyRule:
    """One Megatron tensor and the HF tensors it is made of (``{}`` = layer index)."""

    megatron: str
    hf: Tuple[str, ...]
    transform: Transform = IDENTITY

    def __post_init__(self):
        per_layer = [LAYER in self.megatron] + [LAYER in k for k in self.hf]
        assert len(set(per_layer)) == 1, f"layer pattern on one side only: {self}"

    @property
    def per_layer(self) -> bool:
        return LAYER in self.megatron


@dataclass(frozen=True)
class ConcreteRule:
    """A :class:`KeyRule` with the layer index filled in."""

    megatron: str
    hf: Tuple[str, ...]
    transform: Transform
    layer: Optional[int]


def expand_rules(rules: Sequence[KeyRule], num_layers: int) -> List[ConcreteRule]:
    """Fill in ``{}`` for every layer. Order: global rules in declaration order that come before
    the first per-layer rule, then each layer's rules, then the remaining global rules."""
    first = [r for r in rules[: _first_layer_rule(rules)] if not r.per_layer]
    layered = [r for r in rules if r.per_layer]
    last = [r for r in rules[_first_layer_rule(rules):] if not r.per_layer]
    out = [ConcreteRule(r.megatron, r.hf, r.transform, None) for r in first]
    for i in range(num_layers):
        out += [
            ConcreteRule(r.megatron.format(i), tuple(k.format(i) for k in r.hf), r.transform, i)
            for r in layered
        ]
    out += [ConcreteRule(r.megatron, r.hf, r.transform, None) for r in last]
    return out


def _first_layer_rule(rules: Sequence[KeyRule]) -> int:
    return next((i for i, r in enumerate(rules) if r.per_layer), len(rules))


def convert_hf_to_megatron(
    get_hf: Callable[[str], torch.Tensor], rules: Sequence[ConcreteRule], cfg: ModelConfig
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(megatron_key, tensor)`` one rule at a time; ``get_hf(key)`` loads one HF tensor
    (streaming: at most one rule's tensors are alive here)."""
    for rule in rules:
        yield rule.megatron, rule.transform.to_megatron([get_hf(k) for k in rule.hf], cfg)


def convert_megatron_to_hf(
    get_megatron: Callable[[str], torch.Tensor], rules: Sequence[ConcreteRule], cfg: ModelConfig
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(hf_key, tensor)``; the inverse of :func:`convert_hf_to_megatron`."""
    for rule in rules:
        parts = rule.transform.to_hf(get_megatron(rule.megatron), cfg)
        assert len(parts) == len(rule.hf), (rule, len(parts))
        yield from zip(rule.hf, parts)


# ---------------------------------------------------------------------------------------------
# Architectures and the registry


@dataclass(frozen=True)
class Architecture:
    """One HF model family: its config mapping both ways and its key map."""

    model_type: str
    """HF ``config.json`` ``model_type`` (e.g. ``llama``)."""
    hf_architecture: str
    """HF ``architectures[0]`` (e.g. ``LlamaForCausalLM``)."""
    to_model_config: Callable[[Mapping], ModelConfig]
    """HF config.json dict -> ModelConfig; raises ConversionError for unsupported settings."""
    to_hf_config: Callable[[ModelConfig], Dict]
    """ModelConfig -> the architecture fields of an HF config.json dict."""
    key_rules: Callable[[ModelConfig], List[KeyRule]]
    """The key map for a given config (optional tensors depend on it: biases, QK norm, lm_head)."""
    ignored_hf_keys: Tuple[str, ...] = ()
    """HF tensors that carry no information of their own (a tied ``lm_head.weight``; RoPE buffers)."""

    def rules(self, cfg: ModelConfig) -> List[ConcreteRule]:
        return expand_rules(self.key_rules(cfg), cfg.num_layers)


_REGISTRY: Dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    assert arch.model_type not in _REGISTRY, arch.model_type
    _REGISTRY[arch.model_type] = arch
    return arch


def supported_model_types() -> List[str]:
    _load_architectures()
    return sorted(_REGISTRY)


def architecture_for(hf_config: Mapping) -> Architecture:
    """The Architecture of an HF config.json dict, by ``model_type`` then by ``architectures``."""
    _load_architectures()
    model_type = hf_config.get("model_type")
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    for name in hf_config.get("architectures") or []:
        for arch in _REGISTRY.values():
            if arch.hf_architecture == name:
                return arch
    supported = ", ".join(f"{a.model_type} ({a.hf_architecture})" for a in _REGISTRY.values())
    raise UnsupportedArchitectureError(
        f"unsupported architecture: model_type={model_type!r}, "
        f"architectures={hf_config.get('architectures')!r}. Supported: {supported}. "
        "A new family needs a module in megatron_sft/conversion/ with its key map."
    )


def architecture_by_name(model_type: str) -> Architecture:
    _load_architectures()
    if model_type not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[model_type]


def _load_architectures() -> None:
    # Importing the modules registers them; done lazily to keep common.py import-cycle free.
    from megatron_sft.conversion import llama, qwen2, qwen3  # noqa: F401


# ---------------------------------------------------------------------------------------------
# Config helpers shared by the architecture modules


def require(hf: Mapping, problems: List[str], key: str, expected, why: str) -> None:
    """Record a problem when ``hf[key]`` (if present) differs from ``expected``."""
    if key in hf and hf[key] is not None and hf[key] != expected:
        problems.append(f"{key}={hf[key]!r} is not supported ({why}); expected {expected!r}")


def raise_problems(model_type: str, problems: List[str]) -> None:
    if problems:
        raise UnsupportedArchitectureError(
            f"cannot convert this {model_type} config:\n  - " + "\n  - ".join(problems)
        )
