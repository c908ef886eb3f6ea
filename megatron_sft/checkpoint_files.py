"""A checkpoint directory on disk, as the trainer writes it and the converters read it: the
``iter_*`` names, the latest-iteration pointer, and the checksum manifest with its checks. The
trainer (``training.checkpoint``, ``training.checkpoint_guard``) and conversion both use this
module; neither reads the other's files by hand.

Manifest (``iter_N/manifest.json``, written last, by rank 0, before the rename)::

    {"format": 1, "iteration": N, "run_id": "3f2a...", "history": [10, 20, N],
     "files": {"__0_0.distcp": {"bytes": 123, "crc32": "89abcdef"}, ".metadata": ..., ...}}

``crc32`` is zlib's, streamed in 4 MiB chunks (~3 GB/s on one core). Each rank checksums the
``__<rank>_*.distcp`` files it wrote (torch DCP's file prefix is the global rank); rank 0 adds
the files every rank shares (``.metadata``, ``metadata.json``, config.yaml, ...). At load every
rank verifies a share of the files and all ranks see every problem, so they take one decision.
A converted model carries a manifest too (iteration 0, run id ``converted``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import zlib
from typing import Dict, List, Optional

import torch.distributed as dist

from megatron_sft.errors import InputError, MissingInputError, SFTError

logger = logging.getLogger("megatron_sft")

LATEST_FILE = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
CHUNK_BYTES = 4 << 20
ITER_RE = re.compile(r"iter_(\d{7})")


class CheckpointError(SFTError, ValueError):
    """A checkpoint or save directory the run cannot use as it is; the message names the path and
    says the fix (the CLI prints it and exits 1)."""


# ------------------------------------------------------------------------------ collectives


def global_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def gather_all(value) -> list:
    """Every rank's ``value`` (picklable), on every rank, in rank order."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def from_rank0(value):
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------ layout


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: Optional[str]) -> Optional[int]:
    """Step of the latest complete checkpoint in ``root``; None when there is none.
    Raises ValueError when the pointer file is unreadable or names a missing directory."""
    if not root:
        return None
    pointer = os.path.join(root, LATEST_FILE)
    if not os.path.exists(pointer):
        return None
    text = open(pointer).read().strip()
    if not re.fullmatch(r"\d+", text):
        raise InputError(f"{pointer} holds {text!r}, not an iteration number: fix or delete it")
    iteration = int(text)
    if not os.path.isdir(iteration_dir(root, iteration)):
        raise InputError(f"{pointer} names iteration {iteration} but {iteration_dir(root, iteration)} is "
                         "missing: point it at an existing iter_* directory")
    return iteration


def checkpoint_path(directory: str) -> str:
    """A directory given as a checkpoint: ``SAVE`` (its latest) or one ``iter_*`` / converted dir."""
    iteration = latest_iteration(directory)
    if iteration is not None:
        return iteration_dir(directory, iteration)
    if os.path.exists(os.path.join(directory, "metadata.json")):
        return directory
    raise MissingInputError(f"{directory} is not a checkpoint: no {LATEST_FILE} and no dist_checkpointing "
                            "metadata.json in it")


def iterations(root: str) -> List[int]:
    """Iterations of the complete (renamed) checkpoints in ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(ITER_RE.fullmatch, os.listdir(root)) if m)


# ------------------------------------------------------------------------------ checksums


def file_crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checksum(directory: str, names: List[str]) -> Dict[str, dict]:
    return {name: {"bytes": os.path.getsize(os.path.join(directory, name)),
                   "crc32": file_crc32(os.path.join(directory, name))} for name in names}


def own_shard_files(directory: str, rank: int) -> List[str]:
    """The ``.distcp`` files rank ``rank`` wrote into ``directory``."""
    pattern = re.compile(rf"__{rank}_\d+\.distcp")
    return sorted(n for n in os.listdir(directory) if pattern.fullmatch(n))


def shared_files(directory: str) -> List[str]:
    """Every file of ``directory`` that is not a rank's ``.distcp`` shard (nor the manifest)."""
    return sorted(n for n in os.listdir(directory) if n != MANIFEST and not re.fullmatch(r"__\d+_\d+\.distcp", n)
                  and os.path.isfile(os.path.join(directory, n)))


def write_manifest(directory: str, entries: Dict[str, dict], iteration: int, run_id: str,
                   history: List[int]) -> None:
    manifest = {"format": 1, "iteration": iteration, "run_id": run_id, "history": history,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": entries}
    path = os.path.join(directory, MANIFEST)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(directory: str) -> Optional[dict]:
    """The manifest of checkpoint ``directory``; None when it has none (written before manifests
    existed, or a converted model). Raises CheckpointError when it is unreadable."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no files table")
        return manifest
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({err}): the checkpoint cannot be verified") from err


def _check_file(directory: str, name: str, entry: dict) -> Optional[str]:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        return f"{path} has {size} bytes, {entry['bytes']} when saved (truncated or replaced)"
    crc = file_crc32(path)
    if crc != entry["crc32"]:
        return f"{path} has crc32 {crc}, {entry['crc32']} when saved (its bytes changed)"
    return None


def verify(directory: str) -> List[str]:
    """Collective: every problem of checkpoint ``directory`` against its manifest (each naming the
    file), the same list on every rank; [] when it verifies. The files are split over the ranks.
    Without a manifest only the files dist_checkpointing needs are checked to exist."""
    problems, manifest = [], None
    if global_rank() == 0:
        try:
            manifest = read_manifest(directory)
        except CheckpointError as err:
            problems.append(str(err))
    manifest, problems = from_rank0((manifest, problems))
    if problems:
        return problems
    if manifest is None:
        needed = ["metadata.json", ".metadata"]
        missing = [os.path.join(directory, n) for n in needed if not os.path.isfile(os.path.join(directory, n))]
        if global_rank() == 0 and not missing:
            logger.warning("%s has no %s (saved before manifests existed): loading it unverified", directory, MANIFEST)
        return [f"{path} is missing" for path in missing]
    names = sorted(manifest["files"])
    mine = [n for i, n in enumerate(names) if i % global_world_size() == global_rank()]
    local = [p for p in (_check_file(directory, n, manifest["files"][n]) for n in mine) if p]
    return sorted(p for rank_problems in gather_all(local) for p in rank_problems)


def quick_check(directory: str) -> List[str]:
    """Every manifest file present with its size (no reading): the check a checkpoint just written
    passes before older ones are pruned."""
    manifest = read_manifest(directory)
    if manifest is None:
        return [f"{os.path.join(directory, MANIFEST)} is missing"]
    problems = []
    for name, entry in manifest["files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or os.path.getsize(path) != entry["bytes"]:
            problems.append(f"{path} is missing or has the wrong size")
    return problems
