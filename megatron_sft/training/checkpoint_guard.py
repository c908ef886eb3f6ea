"""What keeps a save directory trustworthy: a checksum manifest per checkpoint, verified before
loading; a lock so one run at a time writes a directory; ownership (a fresh run does not write
into another run's checkpoints unless told); and plain messages for I/O errors.

Manifest (``iter_N/manifest.json``, written last, by rank 0, before the rename)::

    {"format": 1, "iteration": N, "run_id": "3f2a...", "history": [10, 20, N],
     "files": {"__0_0.distcp": {"bytes": 123, "crc32": "89abcdef"}, ".metadata": ..., ...}}

``crc32`` is zlib's, streamed in 4 MiB chunks (~3 GB/s on one core). Each rank checksums the
``__<rank>_*.distcp`` files it wrote (torch DCP's file prefix is the global rank); rank 0 adds
the files every rank shares (``.metadata``, ``metadata.json``, config.yaml, ...). At load every
rank verifies a share of the files and all ranks see every problem, so they take one decision.

``run_id`` is minted by a run that starts without a checkpoint and inherited on resume; every
checkpoint of one run (resubmissions included) carries it. ``history`` lists the iterations this
run saved into this directory, in save order: ``keep_last`` prunes along it, never by number,
so checkpoints of another run, or a newer one a fallback stepped over, are never pruned.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import time
import uuid
import zlib
from typing import Dict, List, Optional

import torch.distributed as dist

from megatron_sft.errors import SFTError

logger = logging.getLogger("megatron_sft")

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
CHUNK_BYTES = 4 << 20
ITER_RE = re.compile(r"iter_(\d{7})")


class CheckpointError(SFTError, ValueError):
    """A checkpoint or save directory the run cannot use as it is; the message names the path and
    says the fix (the CLI prints it and exits 1)."""


# ------------------------------------------------------------------------------ collectives


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
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


def raise_if_any(error: Optional[str]) -> None:
    """Collective: every rank raises CheckpointError when any rank passed an error message (the
    first one by rank), so no rank is left waiting in a collective for one that stopped."""
    errors = [e for e in gather_all(error) if e]
    if errors:
        raise CheckpointError(errors[0])


# ------------------------------------------------------------------------------ I/O errors


def describe_os_error(err: BaseException, path: str) -> Optional[str]:
    """A sentence for an OSError found in ``err`` (or its causes / torch DCP's wrapped failures):
    disk full, read-only, permission. None when there is none."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            where = e.filename or path
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                return f"no space left on {where} (disk or quota full): free space or choose another checkpoint.save"
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return (f"cannot write to {where} ({os.strerror(e.errno)}): make it writable or choose another "
                        "checkpoint.save")
            return f"cannot write to {where}: {os.strerror(e.errno)}"
        todo.extend([e.__cause__, e.__context__])
        failures = getattr(e, "_failures", None) or {}  # torch's CheckpointException: rank -> (exc, tb)
        todo.extend(f[0] if isinstance(f, tuple) else f for f in failures.values())
    return None


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
    if _rank() == 0:
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
        if _rank() == 0 and not missing:
            logger.warning("%s has no %s (saved before manifests existed): loading it unverified", directory, MANIFEST)
        return [f"{path} is missing" for path in missing]
    names = sorted(manifest["files"])
    mine = [n for i, n in enumerate(names) if i % _world() == _rank()]
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


# ------------------------------------------------------------------------------ ownership


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def iterations(root: str) -> List[int]:
    """Iterations of the complete (renamed) checkpoints in ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(ITER_RE.fullmatch, os.listdir(root)) if m)


def owner(directory: str) -> Optional[str]:
    """The run id of checkpoint ``directory``; None without a (readable) manifest."""
    try:
        manifest = read_manifest(directory)
    except CheckpointError:
        return None
    return manifest.get("run_id") if manifest else None


def foreign_checkpoints(root: str, run_id: Optional[str], adopt_unowned: bool) -> List[str]:
    """The ``iter_*`` directories of ``root`` another run wrote: those whose run id is not
    ``run_id``. ``adopt_unowned``: ones without a manifest count as this run's (it resumed from
    such a checkpoint in this directory)."""
    out = []
    for iteration in iterations(root):
        path = os.path.join(root, f"iter_{iteration:07d}")
        theirs = owner(path)
        if theirs == run_id or (theirs is None and adopt_unowned):
            continue
        out.append(path)
    return out


def prunable(root: str, history: List[int], run_id: str, keep_last: int) -> List[str]:
    """The checkpoints ``keep_last`` removes: this run's, older than its ``keep_last`` newest in
    save order (``history``); never one of another run. The newest (just written) must pass
    ``quick_check`` first, or nothing is pruned."""
    if keep_last <= 0 or len(history) <= keep_last:
        return []
    newest = os.path.join(root, f"iter_{history[-1]:07d}")
    problems = quick_check(newest)
    if problems:
        logger.warning("not pruning old checkpoints: the new one does not verify (%s)", "; ".join(problems))
        return []
    keep = set(history[-keep_last:])
    out = []
    for iteration in dict.fromkeys(history[:-keep_last]):
        path = os.path.join(root, f"iter_{iteration:07d}")
        if iteration not in keep and os.path.isdir(path) and owner(path) == run_id:
            out.append(path)
    return out


# ------------------------------------------------------------------------------ the lock


class SaveDirLock:
    """An exclusive ``flock`` on ``SAVE/.lock``, taken by rank 0 for the life of the run (the
    kernel drops it when the process dies, so a crashed run never leaves it held). Needs a
    filesystem with flock support (local, NFS; Lustre mounted with ``-o flock``)."""

    def __init__(self, root: str):
        self.root, self.fd = root, None

    def acquire(self) -> None:
        """Rank 0 only. Raises CheckpointError when another process holds the lock, or when
        ``root`` cannot be created or written."""
        import fcntl

        path = os.path.join(self.root, LOCK_FILE)
        try:
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise CheckpointError(f"checkpoint.save: {describe_os_error(err, self.root)}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise CheckpointError(
                f"checkpoint.save={self.root} is in use by another run ({holder}; lock {path}): wait for that run to "
                "finish, or give this run another --checkpoint.save") from err
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (harmless, reused)
            self.fd = None
