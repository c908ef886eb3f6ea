"""Megatron-side files: the ``model`` dist checkpoint, written and read in one process.

The converter writes each canonical tensor whole (one ShardedTensor per key, TP=1 global shape,
global layer numbers). Megatron's loader reads the slice each rank's sharded state dict asks for,
so the same directory loads at any TP/PP (the fused QKV is grouped per query group and
``linear_fc1`` is [gate; up], both TP-invariant as global tensors).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import typing
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

import megatron_sft.mcore  # noqa: F401  (must precede megatron.core imports)
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_sft.conversion.common import ConversionError
from megatron_sft.processes import write_checkpoints_in_process

MODEL_KEY = "model"
# torch.distributed.checkpoint's CheckpointException derives from BaseException.
READ_ERRORS = (Exception, CheckpointException)


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """dist_checkpointing needs a process group; make a 1-rank gloo one unless one exists."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def cpu_checkpoint_shims() -> Iterator[None]:
    """Megatron's checkpoint writer calls ``torch.cuda.synchronize``/``current_device`` and, for
    a memory log line, psutil. On a machine without CUDA (conversion needs none) stand in for
    them while saving, and restore them afterwards. A no-op where CUDA is available."""
    if torch.cuda.is_available():
        yield
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    saved = (torch.cuda.synchronize, torch.cuda.current_device, filesystem_async._process_memory)
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    if not filesystem_async.HAVE_PSUTIL:
        filesystem_async._process_memory = lambda: 0
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device, filesystem_async._process_memory = saved


def whole_tensor(key: str, tensor: torch.Tensor) -> ShardedTensor:
    """A ShardedTensor holding all of ``tensor`` (no TP/PP sharding)."""
    return ShardedTensor.from_rank_offsets(key, tensor, replica_id=0)


LayerLayout = Literal["per-layer", "stacked"]
"""``per-layer``: keys decoder.layers.N.* (canonical); ``stacked``: decoder.layers.* (Megatron's
default sharded state dict without non_homogeneous_layers)."""
LAYER_LAYOUTS = typing.get_args(LayerLayout)


def save_model(tensors: Dict[str, torch.Tensor], out_dir: Path, layer_layout: str = "per-layer") -> None:
    """Write ``{"model": {key: whole tensor}}`` as a dist checkpoint in ``out_dir`` (exists, empty).

    ``layer_layout``: ``per-layer`` keys ``decoder.layers.N.*`` (Megatron's sharded state dict
    with ``metadata={"non_homogeneous_layers": True}``), or ``stacked``: one tensor per parameter
    with a leading layer axis under ``decoder.layers.*`` (its default without that metadata).
    Either loads at any TP/PP into a model whose sharded state dict uses the same layout."""
    if layer_layout not in LAYER_LAYOUTS:
        raise ValueError(f"layer_layout {layer_layout!r}: use one of {LAYER_LAYOUTS}")
    num_layers = 1 + max((s[1] for s in map(stacked_key, tensors) if s), default=-1)
    state = {}
    for key, tensor in tensors.items():
        stacked = stacked_key(key) if layer_layout == "stacked" else None
        if stacked is None:
            state[key] = whole_tensor(key, tensor)
        else:
            state[key] = ShardedTensor.from_rank_offsets(
                stacked[0], tensor, (0, stacked[1], num_layers), replica_id=0, prepend_axis_num=1)
    write_checkpoints_in_process()  # no spawned results-queue process (megatron_sft/processes.py)
    with single_process_group(), cpu_checkpoint_shims():
        dist_checkpointing.save({MODEL_KEY: state}, str(out_dir))


def tensor_metadata(ckpt_dir: Path) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """``{key: (global shape, dtype)}`` of every tensor in a dist checkpoint."""
    with single_process_group():
        try:
            meta = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
        except READ_ERRORS as err:  # CheckpointingException, missing/corrupt .metadata
            raise ConversionError(f"cannot read the dist checkpoint {ckpt_dir}: {_cause(err)}") from err
    return {k: (tuple(v.global_shape), v.dtype) for k, v in meta.items()}


_LAYER_KEY = re.compile(r"^(decoder\.layers\.)(\d+)\.(.*)$")


def stacked_key(key: str):
    """``decoder.layers.3.mlp.linear_fc2.weight`` -> (``decoder.layers.mlp.linear_fc2.weight``, 3):
    the key Megatron uses when it saves all layers as one tensor [num_layers, ...] (its default
    without ``metadata={"non_homogeneous_layers": True}``); None for non-layer keys."""
    match = _LAYER_KEY.match(key)
    return (match.group(1) + match.group(3), int(match.group(2))) if match else None


def load_tensors(
    ckpt_dir: Path, keys: Sequence[str], metadata: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]
) -> Dict[str, torch.Tensor]:
    """Read whole tensors ``keys`` (canonical per-layer keys, only those) from a dist checkpoint,
    in their saved dtype.

    A checkpoint that stacks layers (see :func:`stacked_key`) is read one stacked tensor at a
    time (all layers of that parameter) and sliced: Megatron's loader cannot read a layer slice
    in a single process. Group ``keys`` by stacked key to read each stacked tensor once."""
    request, slices = {}, {}
    for key in keys:
        if key in metadata:
            request[key] = whole_tensor(key, torch.empty(metadata[key][0], dtype=metadata[key][1]))
            continue
        stacked = stacked_key(key)
        if stacked is None or stacked[0] not in metadata:
            raise KeyError(f"{key} is not in the checkpoint {ckpt_dir}")
        shape, dtype = metadata[stacked[0]]
        request.setdefault(stacked[0], whole_tensor(stacked[0], torch.empty(shape, dtype=dtype)))
        slices[key] = stacked
    with single_process_group():
        try:
            loaded = dist_checkpointing.load({MODEL_KEY: request}, str(ckpt_dir))[MODEL_KEY]
        except READ_ERRORS as err:  # a missing or truncated *.distcp file, a shape mismatch
            raise ConversionError(f"cannot read {sorted(request)[:3]} from {ckpt_dir}: {_cause(err)}") from err
    out = {key: loaded[key] for key in keys if key not in slices}
    out.update({key: loaded[name][layer].clone() for key, (name, layer) in slices.items()})
    return out


def read_groups(keys: Sequence[str], metadata: Dict) -> List[List[str]]:
    """``keys`` in reading order: per layer for a per-layer checkpoint (one layer in memory),
    per stacked key otherwise (all layers of one parameter in memory)."""
    groups: Dict[str, List[str]] = {}
    for key in keys:
        stacked = None if key in metadata else stacked_key(key)
        layer = _LAYER_KEY.match(key)
        group = stacked[0] if stacked else (f"layer {layer.group(2)}" if layer else key)
        groups.setdefault(group, []).append(key)
    return list(groups.values())


def has_tensor(key: str, metadata: Dict) -> bool:
    """``key`` (canonical per-layer) is in the checkpoint, per layer or stacked."""
    stacked = stacked_key(key)
    return key in metadata or (stacked is not None and stacked[0] in metadata)


def _cause(err: BaseException) -> str:
    """One line: DCP's exception text ends with each rank's traceback; its last line is the cause."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__
