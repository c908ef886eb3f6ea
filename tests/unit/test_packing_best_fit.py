"""pack_lengths against a brute-force best-fit decreasing: the same packs, pack for pack (the
capacity index is an optimisation only; it once was a segment tree and must stay exact)."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_sft.data.packing import pack_lengths


def brute_force_packs(lengths, seq_length: int, seed: int) -> list[list[int]]:
    """Best-fit decreasing by scanning every open pack: least room >= need, ties to the pack that
    got that room last; the same seeded item order and pack shuffle as pack_lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(lengths.size), -lengths))
    min_length = int(lengths.min())
    open_packs: list[tuple[int, int, int]] = []  # (room, time the room was set, pack id)
    members: list[list[int]] = []
    for step, item in enumerate(order.tolist()):
        need = int(lengths[item])
        fits = [p for p in open_packs if p[0] >= need]
        if fits:
            best = min(fits, key=lambda p: (p[0], -p[1]))
            open_packs.remove(best)
            room, pack_id = best[0], best[2]
        else:
            room, pack_id = seq_length, len(members)
            members.append([])
        members[pack_id].append(item)
        if room - need >= min_length:
            open_packs.append((room - need, step, pack_id))
    return [sorted(members[p]) for p in rng.permutation(len(members)).tolist()]


@pytest.mark.parametrize("seq_length, low, high", [(64, 1, 65), (1000, 20, 400), (16384, 50, 9000)])
def test_same_packs_as_brute_force(seq_length, low, high):
    rng = np.random.default_rng(seq_length)
    lengths = rng.integers(low, high, size=600)
    for seed in (0, 5):
        assert [p.tolist() for p in pack_lengths(lengths, seq_length, seed)] == brute_force_packs(lengths, seq_length, seed)
