"""The label contract on hand-made arrays (exact values)."""

import numpy as np
import pytest

from megatron_sft.data.labels import IGNORE_INDEX, loss_weights, shift_labels, target_mask

X = IGNORE_INDEX
# The module docstring's example: conversations [10 11 12 13] and [20 21 22].
TOKENS = np.array([10, 11, 12, 13, 20, 21, 22], dtype=np.int32)
MASK = np.array([0, 0, 1, 1, 0, 1, 0], dtype=np.uint8)
CU = np.array([0, 4, 7], dtype=np.int32)


def test_shift_labels_worked_example():
    assert shift_labels(TOKENS, MASK, CU).tolist() == [X, 12, 13, X, 21, X, X]
    assert target_mask(MASK, CU).tolist() == [False, True, True, False, True, False, False]


def test_nothing_crosses_a_boundary():
    # Every token supervised: the last position of each conversation still has no target.
    mask = np.ones(7, dtype=np.uint8)
    assert shift_labels(TOKENS, mask, CU).tolist() == [11, 12, 13, X, 21, 22, X]


def test_single_token_conversations_have_no_target():
    tokens = np.array([5, 6, 7])
    assert shift_labels(tokens, np.ones(3), np.array([0, 1, 2, 3])).tolist() == [X, X, X]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token", [0, 1, 1, 0, 1, 0, 0]),
        ("turn", [0, 0.5, 0.5, 0, 1, 0, 0]),
        ("sequence", [0, 0.5, 0.5, 0, 1, 0, 0]),
    ],
)
def test_loss_weights_worked_example(mode, expected):
    w = loss_weights(MASK, CU, mode)
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, np.array(expected, dtype=np.float32))


def test_turn_and_sequence_differ_with_two_turns():
    # One conversation, two assistant turns of 3 and 1 targets; a second conversation of 2.
    #  index      0 1 2 3 4 5 6 7 | 8 9 10
    mask = np.array([0, 1, 1, 1, 0, 0, 1, 0, 0, 1, 1])
    cu = np.array([0, 8, 11])
    # targets (mask shifted left, per conversation): 1 1 1 0 0 1 0 0 | 1 1 0
    np.testing.assert_allclose(loss_weights(mask, cu, "token"), [1, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0])
    t = 1 / 3
    np.testing.assert_allclose(loss_weights(mask, cu, "turn"), [t, t, t, 0, 0, 1, 0, 0, 0.5, 0.5, 0], rtol=1e-6)
    q = 1 / 4
    np.testing.assert_allclose(loss_weights(mask, cu, "sequence"), [q, q, q, 0, 0, q, 0, 0, 0.5, 0.5, 0], rtol=1e-6)


def test_runs_do_not_merge_across_conversations():
    # Conversation A ends with supervised tokens, B starts supervised: two separate runs.
    mask = np.array([1, 1, 1, 1, 1, 1])
    cu = np.array([0, 3, 6])
    np.testing.assert_allclose(loss_weights(mask, cu, "turn"), [0.5, 0.5, 0, 0.5, 0.5, 0])


def test_totals_per_mode():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 2, 200)
    cu = np.array([0, 17, 60, 61, 140, 200])
    assert loss_weights(mask, cu, "token").sum() == target_mask(mask, cu).sum()
    has = target_mask(mask, cu)
    convs_with_targets = sum(has[a:b].any() for a, b in zip(cu[:-1], cu[1:]))
    assert loss_weights(mask, cu, "sequence").sum() == pytest.approx(convs_with_targets, rel=1e-6)
    runs = int((has & ~np.concatenate([[False], has[:-1]])).sum())
    assert loss_weights(mask, cu, "turn").sum() == pytest.approx(runs, rel=1e-6)


def test_no_targets_and_errors():
    assert loss_weights(np.zeros(4), np.array([0, 4]), "turn").tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="loss mode"):
        loss_weights(MASK, CU, "tokens")
    with pytest.raises(ValueError, match="cu_seqlens"):
        shift_labels(TOKENS, MASK, np.array([0, 4, 6]))
