"""Helper processes of a training process, and what a signal does to them.

SLURM (and ``kill -- -PGID``) delivers SIGTERM to every process of a job step, helpers included;
the trainer itself saves and exits 0 on it (``loop.Trainer``), so its helpers must outlive that
signal and die with the trainer instead:

- DataLoader workers (``data.num_workers > 0``) run ``helper_process_init``: SIGTERM ignored,
  SIGKILL sent to them by the kernel when their parent dies (``PR_SET_PDEATHSIG``, Linux), so a
  ``kill -9`` of the trainer leaves no orphans.
- Megatron-Core 0.19.2's checkpoint writer collects its write results through
  ``multiprocessing.get_context("spawn").Manager().Queue()``: a spawned server process (plus
  Python's resource tracker, ~275 MB together, created at the first save) that SIGTERM kills
  (the save then fails with BrokenPipeError) and that outlives a killed trainer.
  ``write_checkpoints_in_process`` gives that writer an in-process queue instead; our saves are
  synchronous (the writer runs in the calling process), so nothing else changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import sys
from typing import Optional

logger = logging.getLogger("megatron_sft")

PR_SET_PDEATHSIG = 1
"""``prctl`` option (linux/prctl.h): the signal this process gets when its parent thread exits."""


def die_with_parent(parent_pid: Optional[int] = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; False elsewhere).
    With ``parent_pid``, exit at once if the parent is already gone (it may die between our fork
    and this call, and then no signal comes)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
    return True


def helper_process_init(worker_id: int = 0, parent_pid: Optional[int] = None) -> None:
    """Start of every helper process (a DataLoader ``worker_init_fn``): ignore SIGTERM (the
    parent decides when the run ends) and die with the parent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent_pid)


def write_checkpoints_in_process() -> None:
    """Replace the spawned multiprocessing Manager queue of Megatron's checkpoint writer with an
    in-process queue (module docstring). Idempotent; only for synchronous saves, which is what
    ``dist_checkpointing.save`` without an async queue does."""
    import megatron_sft.mcore  # noqa: F401  (must precede megatron.core imports)
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()
    elif not isinstance(filesystem_async._results_queue, queue.Queue):
        logger.warning("Megatron's checkpoint writer already started a results-queue process; "
                       "SIGTERM to the whole process group may break the next save")
