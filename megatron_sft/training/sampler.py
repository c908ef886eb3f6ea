"""Deterministic sample order over one or more packed datasets, resumable at any sample.

The order is a pure function of (dataset sizes, weights, seed, epoch): ``epoch_order`` lists the
epoch's samples as (dataset index, sample index) pairs. Training consumes that order as one
stream; the only state is ``consumed_samples``, the number of packs taken so far over all epochs,
so a resumed run continues at exactly the next sample and each epoch is reshuffled.

Worked example: sizes [3, 2], no weights, seed 0 -> epoch 0 is a seeded permutation of the five
pairs (0,0) (0,1) (0,2) (1,0) (1,1); sample 7 of the stream is position 2 of epoch 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_sft.errors import InputError


def epoch_counts(sizes: Sequence[int], weights: Optional[Sequence[float]]) -> List[int]:
    """Samples drawn from each dataset per epoch.

    Without weights every sample once. With weights the epoch keeps the total size
    ``sum(sizes)`` and splits it in proportion to the weights (largest remainder rounding), so
    ``[1000, 10]`` with weights ``[1, 1]`` draws 505 from each (the small set repeated ~50x).
    """
    sizes = [int(s) for s in sizes]
    if weights is None:
        return sizes
    total = sum(sizes)
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - counts), kind="stable")
    counts[remainder_order[: total - int(counts.sum())]] += 1
    for i, (count, size) in enumerate(zip(counts, sizes)):
        if count > 0 and size == 0:
            raise InputError(f"dataset {i} is empty but has sampling weight {weights[i]}")
    return counts.tolist()


def epoch_order(sizes: Sequence[int], weights: Optional[Sequence[float]], seed: int, epoch: int) -> np.ndarray:
    """The ``[n, 2]`` int64 array of (dataset index, sample index) pairs of one epoch, shuffled.

    A dataset drawn more often than its size is cycled through fresh permutations; one drawn less
    often gets a different random subset every epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    parts = []
    for d, (count, size) in enumerate(zip(epoch_counts(sizes, weights), sizes)):
        if count == 0:
            continue
        num_cycles = -(-count // size)
        picks = np.concatenate([rng.permutation(size) for _ in range(num_cycles)])[:count]
        parts.append(np.stack([np.full(count, d, dtype=np.int64), picks.astype(np.int64)], axis=1))
    if not parts:
        return np.zeros((0, 2), dtype=np.int64)
    order = np.concatenate(parts)
    return order[rng.permutation(len(order))]


@dataclass
class SampleStream:
    """The training order as an endless stream; ``consumed_samples`` is its whole state."""

    sizes: Sequence[int]
    weights: Optional[Sequence[float]]
    seed: int
    consumed_samples: int = 0

    def __post_init__(self):
        self.epoch_length = sum(epoch_counts(self.sizes, self.weights))
        if self.epoch_length == 0:
            raise InputError("the training data holds no samples")
        self._cached_epoch = -1
        self._cached_order = None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            self._cached_order = epoch_order(self.sizes, self.weights, self.seed, epoch)
            self._cached_epoch = epoch
        return self._cached_order

    def peek(self, position: int) -> Tuple[int, int]:
        """(dataset index, sample index) at absolute stream ``position``."""
        epoch, offset = divmod(position, self.epoch_length)
        d, i = self._order(epoch)[offset]
        return int(d), int(i)

    def next_global_batch(self, global_batch_size: int) -> List[Tuple[int, int]]:
        """The next ``global_batch_size`` samples of the stream (advances the state)."""
        start = self.consumed_samples
        batch = [self.peek(p) for p in range(start, start + global_batch_size)]
        self.consumed_samples += global_batch_size
        return batch

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.epoch_length

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "sizes": list(map(int, self.sizes)), "weights": None if self.weights is None else list(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state['consumed_samples']``; the data must be the one the state was made on."""
        if list(state["sizes"]) != list(map(int, self.sizes)):
            raise InputError(f"the checkpoint was trained on datasets of sizes {state['sizes']}, these have "
                             f"{list(self.sizes)}: resume with the same data.train_prefix")
        self.consumed_samples = int(state["consumed_samples"])


def rank_slice(global_batch: Sequence, dp_rank: int, dp_size: int) -> List:
    """The contiguous share of a global batch that data-parallel rank ``dp_rank`` processes.

    Contiguous (not strided) so the same samples form the same micro-batches for every DP size
    that divides the batch: with 8 samples, DP=2 gives rank 0 samples 0-3 and rank 1 samples 4-7.
    """
    assert len(global_batch) % dp_size == 0, (len(global_batch), dp_size)
    per_rank = len(global_batch) // dp_size
    return list(global_batch[dp_rank * per_rank:(dp_rank + 1) * per_rank])


def micro_batches(samples: Sequence, micro_batch_size: int) -> List[List]:
    """Split one rank's samples into consecutive micro-batches of ``micro_batch_size``."""
    assert len(samples) % micro_batch_size == 0, (len(samples), micro_batch_size)
    return [list(samples[i:i + micro_batch_size]) for i in range(0, len(samples), micro_batch_size)]

