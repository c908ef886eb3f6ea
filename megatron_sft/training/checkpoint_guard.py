"""What keeps a save directory trustworthy: a checksum manifest per checkpoint, verified before
loading; a lock so one run at a time writes a directory; ownership (a fresh run does not write
into another run's checkpoints unless told); and plain messages for I/O errors.

The manifest format and its checks live in ``megatron_sft.checkpoint_files``.

``run_id`` is minted by a run that starts without a checkpoint and inherited on resume; every
checkpoint of one run (resubmissions included) carries it. ``history`` lists the iterations this
run saved into this directory, in save order: ``keep_last`` prunes along it, never by number,
so checkpoints of another run, or a newer one a fallback stepped over, are never pruned.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
import uuid
from typing import List, Optional

from megatron_sft.checkpoint_files import CheckpointError, gather_all, iterations, quick_check, read_manifest

logger = logging.getLogger("megatron_sft")

LOCK_FILE = ".lock"


# ------------------------------------------------------------------------------ collectives


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


# ------------------------------------------------------------------------------ ownership


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


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
