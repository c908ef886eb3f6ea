"""Metrics out: one console line per logged step, ``metrics.jsonl``, TensorBoard (rank 0 only).

Every record is a flat JSON object with at least ``step``; training steps carry ``loss``,
``grad_norm``, ``lr``, ``supervised_tokens``; evaluations ``eval_loss`` and ``eval_tokens``.
Per-source losses are ``loss/<source name>`` (train) and ``eval_loss/<source name>``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional

logger = logging.getLogger("megatron_sft")


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO to stdout; other ranks only warnings and errors."""
    logging.basicConfig(format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if rank == 0 else logging.WARNING, force=True)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # Megatron-Core logs every index file it opens and every parameter it buckets at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}"
    return str(value)


class MetricsWriter:
    """Writes records to the console, ``<dir>/metrics.jsonl`` and TensorBoard (when enabled and
    installed). Inactive on ranks other than 0; ``directory=None`` means console only."""

    def __init__(self, directory: Optional[str], *, rank: int, tensorboard: bool):
        self.active = rank == 0
        self._jsonl = None
        self._tb = None
        if not self.active or directory is None:
            return
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.jsonl")
        self._jsonl = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed: TensorBoard logging is off "
                               "(pip install tensorboard, or set --logging.tensorboard=false)")
            else:
                self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

    def write(self, record: dict, *, console: bool = True) -> None:
        if not self.active:
            return
        if console:
            logger.info(" | ".join(f"{k} {_fmt(v)}" for k, v in record.items() if not isinstance(v, dict)))
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def memory_gib() -> Optional[float]:
    """Peak allocated accelerator memory (GiB) since the last call, or process RSS on CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return peak
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except Exception:
        return None
