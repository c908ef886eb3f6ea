"""The converters' settings (``tools/convert_hf_to_megatron.py``, ``tools/convert_megatron_to_hf.py``):
their flags, ``--help`` and checks are generated from these fields (``config.cli``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_sft.conversion.convert import DtypeName
from megatron_sft.conversion.dist_io import LayerLayout


@dataclass
class HFToMegatronSettings:
    """HF model -> Megatron dist checkpoint."""

    hf: str
    """HF model folder (config.json, *.safetensors, tokenizer) or hub name (org/model)."""
    out: str
    """Output directory (must be new or empty)."""
    tp: int = 1
    """Tensor parallel size to check the model against (the checkpoint itself loads at any TP/PP)."""
    pp: int = 1
    """Pipeline parallel size to check the model against."""
    dtype: Optional[DtypeName] = None
    """Cast the weights to this dtype (None: keep the checkpoint's)."""
    layer_layout: LayerLayout = "per-layer"
    """Checkpoint keys decoder.layers.N.* (per-layer, canonical) or stacked decoder.layers.*
    (Megatron's default sharded state dict without non_homogeneous_layers)."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class MegatronToHFSettings:
    """Megatron checkpoint -> HF model directory."""

    megatron: str
    """Save dir (uses latest_checkpointed_iteration.txt), one iter_* dir, or a converted dir."""
    out: str
    """Output HF directory (must be new or empty)."""
    tokenizer: Optional[str] = None
    """Tokenizer to ship, a folder or hub name (None: the training data's, else the converted one)."""
    dtype: Optional[DtypeName] = None
    """Cast the weights to this dtype (None: keep the checkpoint's)."""
    max_shard_gb: float = 5.0
    """Size of one safetensors shard in GiB."""
    progress: bool = True
    """Show a progress bar."""
