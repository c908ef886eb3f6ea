"""Sample order: deterministic per seed, reshuffled per epoch, resumable at the exact sample,
weighted mixtures, contiguous DP shares."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_sft.training.sampler import (SampleStream, epoch_counts, epoch_order,
                                           micro_batches, rank_slice)


def test_epoch_is_a_permutation_and_deterministic():
    a = epoch_order([5, 3], None, seed=1, epoch=0)
    b = epoch_order([5, 3], None, seed=1, epoch=0)
    assert np.array_equal(a, b)
    assert sorted(map(tuple, a.tolist())) == [(0, i) for i in range(5)] + [(1, i) for i in range(3)]


def test_epochs_reshuffle_and_seeds_differ():
    e0 = epoch_order([50], None, seed=1, epoch=0)
    assert not np.array_equal(e0, epoch_order([50], None, seed=1, epoch=1))
    assert not np.array_equal(e0, epoch_order([50], None, seed=2, epoch=0))


def test_weighted_counts_keep_epoch_size():
    assert epoch_counts([1000, 10], None) == [1000, 10]
    assert epoch_counts([1000, 10], [1, 1]) == [505, 505]
    assert epoch_counts([6, 4], [3, 1]) == [8, 2]
    assert sum(epoch_counts([7, 5, 3], [0.2, 0.3, 0.5])) == 15


def test_weighted_small_dataset_is_cycled_with_each_sample_used_evenly():
    order = epoch_order([1000, 10], [1, 1], seed=0, epoch=0)
    small = order[order[:, 0] == 1][:, 1]
    assert len(small) == 505
    counts = np.bincount(small, minlength=10)
    assert counts.max() - counts.min() <= 1


def test_empty_weighted_dataset_is_an_error():
    with pytest.raises(ValueError, match="dataset 1 is empty"):
        epoch_counts([5, 0], [1, 1])


def test_resume_continues_at_the_exact_next_sample_across_epochs():
    full = SampleStream([7, 4], None, seed=3)
    straight = [full.next_global_batch(4) for _ in range(6)]  # 24 samples: crosses 2 epoch ends
    first = SampleStream([7, 4], None, seed=3)
    part = [first.next_global_batch(4) for _ in range(3)]
    resumed = SampleStream([7, 4], None, seed=3)
    resumed.load_state_dict(first.state_dict())
    part += [resumed.next_global_batch(4) for _ in range(3)]
    assert part == straight
    assert resumed.epoch == 2


def test_each_epoch_visits_every_sample_once():
    s = SampleStream([6, 5], None, seed=0)
    for _ in range(3):
        epoch = s.next_global_batch(11)
        assert sorted(epoch) == [(0, i) for i in range(6)] + [(1, i) for i in range(5)]


def test_resume_on_different_data_is_refused():
    s = SampleStream([7], None, seed=0)
    with pytest.raises(ValueError, match="same data.train_prefix"):
        s.load_state_dict(SampleStream([8], None, seed=0).state_dict())


def test_rank_slices_are_contiguous_and_layout_invariant():
    batch = list(range(8))
    assert rank_slice(batch, 0, 2) == [0, 1, 2, 3] and rank_slice(batch, 1, 2) == [4, 5, 6, 7]
    # the same samples form the same micro-batches whether DP=1 or DP=2
    dp1 = micro_batches(rank_slice(batch, 0, 1), 2)
    dp2 = micro_batches(rank_slice(batch, 0, 2), 2) + micro_batches(rank_slice(batch, 1, 2), 2)
    assert dp1 == dp2

