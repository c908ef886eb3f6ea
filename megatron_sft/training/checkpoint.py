"""Checkpoints: megatron.core.dist_checkpointing directories, written atomically.

Layout under ``SAVE``::

    SAVE/iter_0000100/                 dist_checkpointing dir (model, optimizer, rng shards,
                                       common state: scheduler, data position, step counters)
        config.yaml                    the full resolved config (conversion reads ``model:``)
        data_meta.json                 the train dataset's meta (tokenizer, chat template)
    SAVE/latest_checkpointed_iteration.txt   "100", replaced last

Atomicity: every rank writes into ``SAVE/iter_0000100.incomplete``; after a barrier rank 0 adds
the two files, renames the directory to its final name and only then replaces the pointer file
(write to a temp file + ``os.replace``). A crash at any point leaves the pointer on the previous
complete checkpoint; stale ``.incomplete`` directories are ignored and removed by the next save.

The model lives under key ``model`` (virtual pipeline: ``model0``, ``model1``, ...) as the
canonical sharded state dict, so a checkpoint reshards on load to any TP/PP layout; the optimizer
state is keyed by the same parameters (distributed optimizer: ``fully_reshardable``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

import megatron_sft.mcore  # noqa: F401  (must precede megatron.core imports)
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

LATEST_FILE = "latest_checkpointed_iteration.txt"
INCOMPLETE_SUFFIX = ".incomplete"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
        raise ValueError(f"{pointer} holds {text!r}, not an iteration number: fix or delete it")
    iteration = int(text)
    if not os.path.isdir(iteration_dir(root, iteration)):
        raise ValueError(f"{pointer} names iteration {iteration} but {iteration_dir(root, iteration)} is "
                         "missing: point it at an existing iter_* directory")
    return iteration


def checkpoint_path(directory: str) -> str:
    """A directory given as a checkpoint: ``SAVE`` (its latest) or one ``iter_*`` / converted dir."""
    iteration = latest_iteration(directory)
    if iteration is not None:
        return iteration_dir(directory, iteration)
    if os.path.exists(os.path.join(directory, "metadata.json")):
        return directory
    raise FileNotFoundError(f"{directory} is not a checkpoint: no {LATEST_FILE} and no dist_checkpointing "
                            "metadata.json in it")


def rng_state_sharded(rank: int, world_size: int) -> ShardedObject:
    """This rank's RNG states (python, numpy, torch, CUDA, Megatron's tracker), one shard per rank."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        state["tracker"] = get_cuda_rng_tracker().get_states()
    except Exception:  # tracker not initialised (tests without Megatron's RNG)
        pass
    return ShardedObject("rng_state", state, (world_size,), (rank,), replica_id=0)


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        get_cuda_rng_tracker().set_states(state["tracker"])


def check_save_dependencies() -> None:
    """Megatron's dist_checkpointing writer needs psutil (not declared by megatron-core): fail
    at start-up, not at the first save hours later."""
    try:
        import psutil  # noqa: F401
    except ImportError as err:
        raise ValueError("checkpoint.save needs the psutil package (Megatron's checkpoint writer uses it): "
                         "pip install psutil") from err


def save_checkpoint(root: str, iteration: int, sharded_state_dict: dict, files: Dict[str, str],
                    keep_last: int = 0) -> str:
    """Write ``sharded_state_dict`` (all ranks) plus text ``files`` (rank 0) as
    ``root/iter_{iteration}`` atomically; returns the final directory. Collective."""
    final = iteration_dir(root, iteration)
    tmp = final + INCOMPLETE_SUFFIX
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(sharded_state_dict, tmp)
    _barrier()
    if _rank() == 0:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        if os.path.exists(final):  # re-saving a step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_pointer(root, iteration)
        _prune(root, keep_last)
    _barrier()
    return final


def _write_pointer(root: str, iteration: int) -> None:
    tmp = os.path.join(root, LATEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST_FILE))


def _prune(root: str, keep_last: int) -> None:
    """Remove stale ``.incomplete`` directories and, with ``keep_last``, all but the newest N."""
    complete = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.endswith(INCOMPLETE_SUFFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif re.fullmatch(r"iter_\d{7}", name):
            complete.append(path)
    if keep_last > 0:
        for path in sorted(complete)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(directory: str, sharded_state_dict: dict) -> dict:
    """Load the shards of ``sharded_state_dict`` from checkpoint ``directory`` (any TP/PP layout).
    Collective. Raises FileNotFoundError/ValueError with the path on a missing or bad checkpoint."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    try:
        return dist_checkpointing.load(sharded_state_dict, directory)
    except Exception as err:  # CheckpointingException, KeyError on missing shards, torch errors
        raise ValueError(f"cannot load checkpoint {directory}: {type(err).__name__}: {err}") from err


def read_common_json(directory: str, name: str) -> Optional[dict]:
    path = os.path.join(directory, name)
    return json.load(open(path)) if os.path.exists(path) else None
