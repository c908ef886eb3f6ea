"""Packing conversations into training sequences: pure functions over lengths.

A *pack* is a list of conversation indices whose lengths sum to at most ``seq_length`` real
tokens. No conversation is split across packs; conversations longer than ``seq_length`` must be
dropped or truncated by the caller before packing (``pack_lengths`` refuses them).

Algorithm: best-fit decreasing. Items are visited longest first (equal lengths in an order drawn
from the seed, so the seed decides which of several interchangeable conversations go together);
each goes into the open pack whose remaining capacity is the smallest that still fits it (among
packs with equal room, the one that got it last), or a new pack. Open packs are indexed by their
distinct remaining capacities in a sorted list, so a placement is a binary search. Packs are
finally returned in a seeded shuffled order, and the conversations inside a pack in ascending
index order.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PackingStats:
    """Summary of a packing: ``fill_ratio`` = real tokens / (packs x seq_length)."""

    num_packs: int
    num_conversations: int
    num_real_tokens: int
    seq_length: int

    @property
    def fill_ratio(self) -> float:
        if self.num_packs == 0:
            return 0.0
        return self.num_real_tokens / (self.num_packs * self.seq_length)


class _CapacityIndex:
    """Open packs grouped by remaining capacity, with "smallest capacity >= n" by binary search.

    ``_capacities`` is the sorted list of distinct capacities that at least one open pack has;
    each maps to a stack of pack ids (the most recently opened or refilled is used first).
    Worked example (open packs A with room 2, B and C with room 5, C added last):
    ``_capacities == [2, 5]``; ``pop_best_fit(3)`` bisects to 5 and returns (5, C); B stays.
    A search is O(log n) and an insertion or removal moves at most the distinct open capacities
    (<= seq_length) in C: ~1.5 us per item in CPython, 3-4x less than the segment tree it
    replaced (same packs; it was the serial part of preprocessing with many workers).
    """

    def __init__(self, seq_length: int):
        self._capacities: list[int] = []
        self._packs_by_capacity: dict[int, list[int]] = {}

    def add(self, capacity: int, pack_id: int) -> None:
        packs = self._packs_by_capacity.get(capacity)
        if packs is None:
            self._packs_by_capacity[capacity] = [pack_id]
            bisect.insort(self._capacities, capacity)
        else:
            packs.append(pack_id)

    def pop_best_fit(self, need: int) -> tuple[int, int] | None:
        """Remove and return (capacity, pack_id) of the open pack with the least room >= need."""
        capacities = self._capacities
        i = bisect.bisect_left(capacities, need)
        if i == len(capacities):
            return None
        capacity = capacities[i]
        packs = self._packs_by_capacity[capacity]
        pack_id = packs.pop()
        if not packs:
            del self._packs_by_capacity[capacity]
            del capacities[i]
        return capacity, pack_id


def pack_lengths(lengths, seq_length: int, seed: int) -> list[np.ndarray]:
    """Best-fit-decreasing packing of items with the given lengths into packs of at most
    ``seq_length`` tokens.

    Args:
        lengths: 1-D ints, the real token count of each conversation (all in 1..seq_length).
        seq_length: pack capacity in tokens.
        seed: decides the order among equal lengths and the final order of the packs.

    Returns:
        One int64 array of conversation indices per pack (ascending inside a pack); the packs in
        a seeded shuffled order. Every index 0..len(lengths)-1 appears in exactly one pack.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if lengths.size == 0:
        return []
    if lengths.min() < 1 or lengths.max() > seq_length:
        bad = int(np.flatnonzero((lengths < 1) | (lengths > seq_length))[0])
        raise ValueError(
            f"item {bad} has length {int(lengths[bad])}, outside 1..seq_length={seq_length}; "
            "drop or truncate over-length conversations before packing"
        )
    rng = np.random.default_rng(seed)
    tie_break = rng.permutation(lengths.size)
    order = np.lexsort((tie_break, -lengths))  # longest first, ties in seeded order

    # A pack whose room is below the shortest item can never take another one: close it.
    min_length = int(lengths.min())
    index = _CapacityIndex(seq_length)
    members: list[list[int]] = []
    for item in order.tolist():
        need = int(lengths[item])
        found = index.pop_best_fit(need)
        if found is None:
            capacity, pack_id = seq_length, len(members)
            members.append([])
        else:
            capacity, pack_id = found
        members[pack_id].append(item)
        room = capacity - need
        if room >= min_length:
            index.add(room, pack_id)

    pack_order = rng.permutation(len(members))
    return [np.sort(np.asarray(members[p], dtype=np.int64)) for p in pack_order.tolist()]


def packing_stats(packs: list[np.ndarray], lengths, seq_length: int) -> PackingStats:
    """Counts and fill ratio of a packing produced by ``pack_lengths``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    num_conversations = sum(len(p) for p in packs)
    num_real_tokens = int(sum(int(lengths[p].sum()) for p in packs))
    return PackingStats(len(packs), num_conversations, num_real_tokens, seq_length)
