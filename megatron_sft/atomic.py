"""Write to a staging place, publish by rename: an interrupted writer (kill -9, full disk) never
leaves something that looks complete. The one home of that rule for trainer checkpoints,
converted models and preprocessed file sets.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence, Tuple, Union

INCOMPLETE_SUFFIX = ".incomplete"
"""A directory being written: ``FINAL.incomplete``; stale ones are safe to delete."""
REPLACED_SUFFIX = ".replaced"
"""The previous ``FINAL`` while a new one is renamed in (put back if that rename fails)."""

PathLike = Union[str, Path]


def staging_dir(final: PathLike) -> str:
    """A fresh, empty ``FINAL.incomplete`` (a leftover of an interrupted writer is removed);
    parent folders are created."""
    staging = str(final) + INCOMPLETE_SUFFIX
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def publish_dir(staging: PathLike, final: PathLike, *, keep_replaced: bool = False) -> None:
    """Rename ``staging`` to ``final``. An existing ``final`` is moved to ``FINAL.replaced`` first
    and put back if the rename fails; after success it is deleted, or kept for the caller to
    remove later (``keep_replaced``: e.g. once a pointer naming the new one is written)."""
    final = str(final)
    replaced = final + REPLACED_SUFFIX
    if os.path.exists(final):
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    try:
        os.rename(staging, final)
    except OSError:
        if os.path.exists(replaced):
            os.rename(replaced, final)
        raise
    if not keep_replaced:
        shutil.rmtree(replaced, ignore_errors=True)


def publish_files(moves: Sequence[Tuple[PathLike, PathLike]], marker: PathLike) -> None:
    """Move finished files into place (``moves``: staging path -> final path, in order). The
    ``marker`` (a file whose presence says the set is complete) is removed first and must be the
    last move, so a crash half way leaves a set without its marker, which readers refuse."""
    if str(moves[-1][1]) != str(marker):
        raise ValueError(f"the marker {marker} must be moved last")  # a bug in the caller
    if os.path.exists(marker):
        os.remove(marker)
    for staged, final in moves:
        os.replace(staged, final)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Replace the file ``path`` with ``text`` in one rename (fsync'd first): readers see the old
    content or the new, never a torn write."""
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
