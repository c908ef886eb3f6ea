"""Metrics out: one console line per logged step, ``metrics.jsonl``, TensorBoard and optionally
Weights & Biases (rank 0 only).

Every record is a flat JSON object with at least ``step``; training steps carry ``loss``,
``grad_norm``, ``lr``, ``supervised_tokens``, ``tokens_per_s_per_gpu``, ``tflops_per_gpu``,
``mfu`` (null when the device's peak is unknown, e.g. on CPU), ``step_time_s``, ``memory_gib``;
evaluations ``eval_loss`` and ``eval_tokens``. Per-source losses are ``loss/<source name>``
(train) and ``eval_loss/<source name>``. The JSON keys never change with the device; "per GPU"
means per rank (process) on CPU, and ``memory_gib`` is the process's peak RSS there.

A file holds one record per (kind, step), kind = eval or train: a resumed run redoes the steps
after its checkpoint and an ``--eval-only`` run re-evaluates a saved step, and their records
replace the earlier ones (the file is compacted when a writer opens and closes it;
``read_metrics`` applies the same rule to a file left by a crashed run).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from typing import Iterable, List, Optional, Tuple

from megatron_sft.atomic import write_text_atomic
from megatron_sft.errors import InputError, MissingInputError

logger = logging.getLogger("megatron_sft")

METRICS_FILE = "metrics.jsonl"


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO to stdout; other ranks only warnings and errors."""
    logging.basicConfig(format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if rank == 0 else logging.WARNING, force=True)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # Megatron-Core logs every index file it opens and every parameter it buckets at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------- records


def record_key(record: dict) -> Tuple[str, int]:
    """(kind, step): the identity of a record in a metrics file."""
    return ("eval" if "eval_loss" in record else "train", int(record.get("step", 0)))


def dedupe_records(records: Iterable[dict]) -> List[dict]:
    """The last record of each (kind, step), ordered by step (file order within a step)."""
    last = {}
    for position, record in enumerate(records):
        last[record_key(record)] = (position, record)
    ordered = sorted(last.values(), key=lambda item: (record_key(item[1])[1], item[0]))
    return [record for _, record in ordered]


def _load(path: str) -> Tuple[List[dict], int]:
    """(records, number of non-blank lines). A line that is not JSON (e.g. cut short by a killed
    run) is skipped with a warning naming it."""
    records, num_lines = [], 0
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            num_lines += 1
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                logger.warning("%s:%d: skipping a line that is not a JSON record (%s)", path, line_no, err.msg)
    return records, num_lines


def read_metrics(path: str) -> List[dict]:
    """Records of a metrics file (or of ``<dir>/metrics.jsonl``), one per (kind, step) as
    documented above. Raises FileNotFoundError naming the path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(path):
        raise MissingInputError(f"no metrics file at {path} (pretrain_sft.py writes <logging.dir or "
                                f"checkpoint.save>/{METRICS_FILE})")
    return dedupe_records(_load(path)[0])


def compact_metrics(path: str) -> None:
    """Rewrite ``path`` with one record per (kind, step) when it holds duplicates or broken lines."""
    if not os.path.isfile(path):
        return
    loaded, num_lines = _load(path)
    records = dedupe_records(loaded)
    if len(records) == num_lines:
        return
    write_text_atomic(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in records))


# ---------------------------------------------------------------------------------- console


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value or math.isinf(value):
            return str(value)
        if abs(value) < 1e-3 or abs(value) >= 1e5:
            return f"{value:.4g}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def console_line(record: dict, *, cuda: bool) -> str:
    """``step N | key value | ...`` for a person: absent values (``mfu`` None) are left out,
    per-GPU rates are labelled per rank without CUDA, a single source's loss (equal to the
    total) is not repeated. The JSON record keeps its keys unchanged."""
    unit = "gpu" if cuda else "rank"
    labels = {"tokens_per_s_per_gpu": f"tokens/s/{unit}", "tflops_per_gpu": f"TFLOP/s/{unit}",
              "memory_gib": "memory_gib" if cuda else "max_rss_gib"}
    per_source = [k for k in record if "/" in k]
    parts = []
    for key, value in record.items():
        if value is None or isinstance(value, dict) or (key in per_source and len(per_source) == 1):
            continue
        if key == "mfu":
            parts.append(f"mfu {100 * value:.1f}%")
        elif value is True:
            parts.append(key)
        else:
            parts.append(f"{labels.get(key, key)} {_fmt(value)}")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------- writer


class MetricsWriter:
    """Writes records to the console, ``<dir>/metrics.jsonl``, TensorBoard (when enabled and
    installed) and W&B (when ``wandb_project`` is set). Inactive on ranks other than 0;
    ``directory=None`` means no files. A set ``wandb_project`` without the wandb package is a
    ValueError on every rank (so no rank waits for one that stopped)."""

    def __init__(self, directory: Optional[str], *, rank: int, tensorboard: bool,
                 wandb_project: Optional[str] = None, wandb_config: Optional[dict] = None):
        import torch

        if wandb_project and importlib.util.find_spec("wandb") is None:
            raise InputError(f"logging.wandb_project={wandb_project!r} needs the wandb package: pip install "
                             "wandb (or bash install.sh --wandb), or leave logging.wandb_project unset")
        self.active = rank == 0
        self.cuda = torch.cuda.is_available()
        self.directory, self.path = directory, None
        self._jsonl = self._tb = self._wandb = None
        self._tensorboard = tensorboard and directory is not None
        if not self.active:
            return
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            self.path = os.path.join(directory, METRICS_FILE)
            compact_metrics(self.path)
            self._jsonl = open(self.path, "a", buffering=1)
        if wandb_project:
            self._wandb = _open_wandb(wandb_project, directory, wandb_config)

    def write(self, record: dict, *, console: bool = True) -> None:
        if not self.active:
            return
        if console:
            logger.info(console_line(record, cuda=self.cuda))
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = int(record.get("step", 0))
        if self._tensorboard and self._tb is None:
            self._tb = _open_tensorboard(self.directory, record)
            self._tensorboard = self._tb is not None
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
            compact_metrics(self.path)
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _open_tensorboard(directory: str, first_record: dict):
    """A SummaryWriter under ``<directory>/tensorboard``, or None (with a warning) when the
    tensorboard package is missing. Opened at the first record: when that is a training step
    (a resumed run), TensorBoard's events at that step and later are purged, since the run redoes
    them; an --eval-only run (first record an evaluation) purges nothing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("tensorboard is not installed: TensorBoard logging is off (pip install -e .[tensorboard] "
                       "or bash install.sh; or set --logging.tensorboard=false)")
        return None
    kind, step = record_key(first_record)
    return SummaryWriter(os.path.join(directory, "tensorboard"), purge_step=step if kind == "train" else None)


def _open_wandb(project: str, directory: Optional[str], config: Optional[dict]):
    """A W&B run named after the metrics directory (its files under ``<directory>/wandb``)."""
    import wandb

    name = os.path.basename(os.path.normpath(directory)) if directory else None
    return wandb.init(project=project, name=name, dir=directory, config=config)


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
