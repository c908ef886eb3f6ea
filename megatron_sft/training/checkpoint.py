"""Checkpoints: megatron.core.dist_checkpointing directories, written atomically.

Layout under ``SAVE``::

    SAVE/iter_0000100/                 dist_checkpointing dir (model, optimizer, rng shards,
                                       common state: scheduler, data position, step counters)
        config.yaml                    the full resolved config (conversion reads ``model:``)
        data_meta.json                 the train dataset's meta (tokenizer, chat template)
        manifest.json                  size + crc32 of every file, run id, this run's history
                                       (``megatron_sft.checkpoint_files``); verified before every load
    SAVE/latest_checkpointed_iteration.txt   "100", replaced last

Atomicity: every rank writes into ``SAVE/iter_0000100.incomplete``; after a barrier rank 0 adds
the common files and the manifest, renames the directory to its final name and only then
replaces the pointer file (write to a temp file + ``os.replace``). A crash at any point leaves the pointer on the previous
complete checkpoint; stale ``.incomplete`` directories are ignored and removed by the next save
(the save directory's lock guarantees that no other run is writing them).

The model lives under key ``model`` (virtual pipeline: ``model0``, ``model1``, ...) as the
canonical sharded state dict, so a checkpoint reshards on load to any TP/PP layout; the optimizer
state is keyed by the same parameters (distributed optimizer: ``fully_reshardable``).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

import megatron_sft.mcore  # noqa: F401  (must precede megatron.core imports)
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_sft.atomic import INCOMPLETE_SUFFIX, REPLACED_SUFFIX, publish_dir, staging_dir, write_text_atomic
from megatron_sft.checkpoint_files import (ITER_RE, LATEST_FILE, MANIFEST, CheckpointError, checksum, from_rank0,
                                          gather_all, global_rank, iteration_dir, iterations, latest_iteration,
                                          own_shard_files, read_manifest, shared_files, verify, write_manifest)
from megatron_sft.errors import InputError
from megatron_sft.training import checkpoint_guard as guard

logger = logging.getLogger("megatron_sft")

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}







def rng_state_sharded(rank: int, world_size: int) -> ShardedObject:
    """This rank's RNG states (python, numpy, torch, CUDA, Megatron's tracker), one shard per rank."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state["tracker"] = get_cuda_rng_tracker().get_states()  # set up by runtime.setup_model_parallel
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
        raise InputError("checkpoint.save needs the psutil package (Megatron's checkpoint writer uses it): "
                         "pip install psutil") from err


def _is_fatal(err: BaseException) -> bool:
    return isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit))


def _describe(err: BaseException, path: str) -> str:
    return guard.describe_os_error(err, path) or f"{type(err).__name__}: {str(err)[:500]}"


def save_checkpoint(root: str, iteration: int, sharded_state_dict: dict, files: Dict[str, str], *,
                    run_id: str, history: List[int], keep_last: int = 0) -> str:
    """Write ``sharded_state_dict`` (all ranks) plus text ``files`` (rank 0) as
    ``root/iter_{iteration}`` atomically with its manifest (``history``: this run's earlier
    iterations in ``root``, in save order); returns the final directory. Collective. Any failure
    (disk full, read-only, ...) is a CheckpointError on every rank naming the path; the pointer
    and every earlier checkpoint are left as they were."""
    final = iteration_dir(root, iteration)
    tmp = final + INCOMPLETE_SUFFIX
    error = _try(lambda: staging_dir(final), tmp) if global_rank() == 0 else None
    guard.raise_if_any(error and _save_failed(root, final, error))
    entries: dict = {}

    def write_shards():
        dist_checkpointing.save(sharded_state_dict, tmp)
        entries.update(checksum(tmp, own_shard_files(tmp, global_rank())))

    error = _try(write_shards, tmp)
    gathered = gather_all((error, entries))
    error = next((e for e, _ in gathered if e), None)
    if global_rank() == 0:
        if error is None:
            for _, rank_entries in gathered:
                entries.update(rank_entries)
            history = [i for i in history if i != iteration] + [iteration]
            error = _try(lambda: _finish(root, iteration, tmp, files, entries, run_id, history, keep_last), tmp)
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    guard.raise_if_any(error and _save_failed(root, final, error))
    return final


def _save_failed(root: str, final: str, error: str) -> str:
    previous = latest_iteration_or_none(root)
    kept = f"{LATEST_FILE} still names iteration {previous}" if previous is not None else "there was none before"
    return f"cannot save checkpoint {final}: {error}. The previous checkpoint is intact ({kept})"


def _try(action, path: str) -> Optional[str]:
    try:
        action()
        return None
    except BaseException as err:  # torch's CheckpointException derives from BaseException
        if _is_fatal(err):
            raise
        return _describe(err, path)


def _finish(root: str, iteration: int, tmp: str, files: Dict[str, str], entries: dict, run_id: str,
            history: List[int], keep_last: int) -> None:
    """Rank 0, after every rank wrote its shards: common files, manifest, rename, pointer, prune."""
    for name, text in files.items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    entries.update(checksum(tmp, shared_files(tmp)))
    write_manifest(tmp, entries, iteration, run_id, history)
    # Re-saving a step (e.g. SIGTERM right after a periodic save) replaces it; the old copy is put
    # back if the rename fails (the pointer may name it) and pruned once the pointer moved.
    publish_dir(tmp, iteration_dir(root, iteration), keep_replaced=True)
    _write_pointer(root, iteration)
    _prune(root, history, run_id, keep_last)


def latest_iteration_or_none(root: str) -> Optional[int]:
    try:
        return latest_iteration(root)
    except ValueError:
        return None


def _write_pointer(root: str, iteration: int) -> None:
    write_text_atomic(os.path.join(root, LATEST_FILE), f"{iteration}\n")


def _prune(root: str, history: List[int], run_id: str, keep_last: int) -> None:
    """Remove stale ``.incomplete``/``.replaced`` directories (the save-dir lock guarantees no
    other run is writing them) and, with ``keep_last``, this run's older checkpoints."""
    for name in os.listdir(root):
        if name.endswith((INCOMPLETE_SUFFIX, REPLACED_SUFFIX)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    for path in guard.prunable(root, history, run_id, keep_last):
        logger.info("keep_last=%d: removing %s", keep_last, path)
        shutil.rmtree(path, ignore_errors=True)


def claim_save_dir(save: Optional[str], resumed: Optional[str], skipped: List[str],
                   overwrite: bool) -> Tuple[str, List[int]]:
    """Collective: (run id, history) of this run, inherited from checkpoint ``resumed`` (None for
    a fresh start), after checking that ``save`` holds no other run's checkpoints (the ones the
    fallback ``skipped`` count as this run's): a CheckpointError unless ``overwrite``."""
    manifest = from_rank0(read_manifest(resumed) if resumed and global_rank() == 0 else None) or {}
    run_id = manifest.get("run_id") or from_rank0(guard.new_run_id())
    in_save = bool(resumed and save and os.path.abspath(os.path.dirname(resumed)) == os.path.abspath(save))
    history: List[int] = []
    if in_save:  # a checkpoint saved before manifests existed: its own step starts the history
        match = ITER_RE.fullmatch(os.path.basename(resumed))
        history = list(manifest.get("history") or ([int(match.group(1))] if match else []))
    error = None
    if save and global_rank() == 0:
        skipped_abs = {os.path.abspath(p) for p in skipped}
        foreign = [p for p in guard.foreign_checkpoints(save, run_id, adopt_unowned=in_save and not manifest)
                   if os.path.abspath(p) not in skipped_abs]
        names = ", ".join(os.path.basename(p) for p in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        if foreign and not overwrite:
            error = (f"checkpoint.save={save} holds {len(foreign)} checkpoint(s) of another run ({names}); this run "
                     f"would overwrite them and move its pointer. Resume that run with --checkpoint.load={save}, "
                     "choose a new --checkpoint.save, or set --checkpoint.overwrite=true to write here")
        elif foreign:
            logger.warning("checkpoint.overwrite=true: writing into %s, which holds checkpoints of another run (%s); "
                           "same steps are replaced, the others kept", save, names)
    guard.raise_if_any(error)
    return run_id, history


# ------------------------------------------------------------------------------ loading


def _candidates(root: str) -> List[str]:
    """Checkpoint dirs of save dir ``root`` to resume from, best first: the pointer's, then older
    ones newest first. Without a pointer (deleted), every ``iter_*`` newest first, with a warning.
    ``root`` itself when it is one checkpoint (an ``iter_*`` dir)."""
    found = iterations(root)
    if not found and any(os.path.isfile(os.path.join(root, n)) for n in ("metadata.json", MANIFEST)):
        return [root]
    pointer = os.path.join(root, LATEST_FILE)
    if os.path.exists(pointer):
        text = open(pointer).read().strip()
        if re.fullmatch(r"\d+", text):
            top = int(text)
            return [iteration_dir(root, top)] + [iteration_dir(root, i) for i in reversed(found) if i < top]
        logger.warning("%s holds %r, not an iteration number: ignoring it", pointer, text)
    if found:
        logger.warning("%s has no valid %s but holds %d iter_* checkpoint(s): resuming from the newest that "
                       "verifies", root, LATEST_FILE, len(found))
    return [iteration_dir(root, i) for i in reversed(found)]


def resolve_resume(root: str, fallback: bool) -> Tuple[Optional[str], List[str]]:
    """Collective: (the checkpoint of save dir ``root`` to resume from, verified against its
    manifest on every rank, or None when ``root`` holds none; the newer ones skipped). A
    checkpoint that fails verification is a CheckpointError listing each bad file, or, with
    ``fallback``, skipped (logged) for the newest older one that verifies."""
    candidates = from_rank0(_candidates(root) if global_rank() == 0 else None)
    failed: List[str] = []
    for path in candidates:
        problems = _verify_or_missing(path)
        if not problems:
            if failed and global_rank() == 0:
                logger.warning("checkpoint.fallback_to_previous=true: resuming from %s, the newest checkpoint that "
                               "verifies (skipped: %s)", path, ", ".join(failed))
            return path, failed
        if global_rank() == 0:
            logger.error("checkpoint %s fails verification:\n  - %s", path, "\n  - ".join(problems))
        failed.append(path)
        if not fallback:
            raise CheckpointError(
                f"checkpoint {path} fails verification ({'; '.join(problems[:5])}); refusing to resume from it. "
                f"Restore the file(s) from a copy, or set --checkpoint.fallback_to_previous=true to resume from the "
                f"newest older checkpoint in {root} that verifies")
    if failed:
        raise CheckpointError(f"no checkpoint in {root} verifies (tried {', '.join(failed)}): restore one from "
                              "a copy, or start a new run with another checkpoint.save")
    return None, []


def _verify_or_missing(path: str) -> List[str]:
    if not os.path.isdir(path):
        return [f"{path} is missing (named by {LATEST_FILE})"]
    return verify(path)


def verify_or_raise(path: str) -> None:
    """Collective: a CheckpointError listing every problem of checkpoint ``path``, if any."""
    problems = _verify_or_missing(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} fails verification ({'; '.join(problems[:5])}): restore "
                              "the file(s) from a copy or point at another checkpoint")


def load_checkpoint(directory: str, sharded_state_dict: dict) -> dict:
    """Load the shards of ``sharded_state_dict`` from checkpoint ``directory`` (any TP/PP layout).
    Collective. Raises CheckpointError (a ValueError) naming the path on a missing or bad checkpoint."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    try:
        return dist_checkpointing.load(sharded_state_dict, directory)
    except BaseException as err:  # CheckpointingException, torch's CheckpointException (a BaseException), ...
        if _is_fatal(err):
            raise
        raise CheckpointError(f"cannot load checkpoint {directory}: {_describe(err, directory)}") from err


def load_common(directory: str) -> dict:
    """The common (non-sharded) state of checkpoint ``directory``; CheckpointError naming it."""
    try:
        return dist_checkpointing.load_common_state_dict(directory)
    except BaseException as err:
        if _is_fatal(err):
            raise
        raise CheckpointError(f"cannot read the common state of checkpoint {directory}: "
                              f"{_describe(err, directory)}") from err
