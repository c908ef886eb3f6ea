"""Packing conversations into training sequences: pure functions over lengths.

A *pack* is a list of conversation indices whose lengths sum to at most ``seq_length`` real
tokens. No conversation is split across packs; conversations longer than ``seq_length`` must be
dropped or truncated by the caller before packing (``pack_lengths`` refuses them).

Algorithm: best-fit decreasing. Items are visited longest first (equal lengths in an order drawn
from the seed, so the seed decides which of several interchangeable conversations go together);
each goes into the open pack whose remaining capacity is the smallest that still fits it, or a new
pack. Open packs are kept in a segment tree over remaining capacities, so each placement costs
O(log seq_length) whatever the number of packs. Packs are finally returned in a seeded shuffled
order, and the conversations inside a pack in ascending index order.
"""

from __future__ import annotations

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
    """Open packs grouped by remaining capacity, with "smallest capacity >= n" in O(log S).

    A segment tree over capacities 0..seq_length: leaf c is non-zero when at least one open pack
    has exactly c tokens of room. Worked example (seq_length 7, leaves 0..7): open packs with room
    2 and 5 -> leaves [0,0,1,0,0,1,0,0]; ``pop_best_fit(3)`` walks up from leaf 3 to the first
    right subtree holding a 1 and down to its leftmost 1, i.e. capacity 5.
    """

    def __init__(self, seq_length: int):
        size = 1
        while size < seq_length + 1:
            size *= 2
        self._size = size
        self._tree = [0] * (2 * size)  # node = number of open packs below it
        self._packs_by_capacity: dict[int, list[int]] = {}

    def add(self, capacity: int, pack_id: int) -> None:
        self._packs_by_capacity.setdefault(capacity, []).append(pack_id)
        node = capacity + self._size
        tree = self._tree
        while node:
            tree[node] += 1
            node //= 2

    def pop_best_fit(self, need: int) -> tuple[int, int] | None:
        """Remove and return (capacity, pack_id) of the open pack with the least room >= need."""
        tree, size = self._tree, self._size
        if need >= size or tree[1] == 0:
            return None
        node = need + size
        if tree[node] == 0:
            # Climb until a right sibling subtree holds an open pack.
            while True:
                if node == 1:
                    return None
                if node % 2 == 0 and tree[node + 1] > 0:
                    node += 1
                    break
                node //= 2
            while node < size:  # descend to the leftmost non-empty leaf
                node = 2 * node if tree[2 * node] > 0 else 2 * node + 1
        capacity = node - size
        packs = self._packs_by_capacity[capacity]
        pack_id = packs.pop()
        if not packs:
            del self._packs_by_capacity[capacity]
        while node:
            tree[node] -= 1
            node //= 2
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
