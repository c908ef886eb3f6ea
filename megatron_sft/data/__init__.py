"""Chat data: formats, chat masks, packing, the packed indexed file set and its reader.

``PackedDataset`` is imported lazily: it pulls in Megatron-Core (seconds), which the
preprocessing workers that only render and tokenize do not need.
"""

from __future__ import annotations

__all__ = ["PackedDataset"]


def __getattr__(name: str):
    if name == "PackedDataset":
        from megatron_sft.data.indexed import PackedDataset

        return PackedDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
