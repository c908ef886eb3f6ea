"""The one label contract: next-token targets and loss weights, per conversation.

Stored data (see DESIGN "Data contract"): ``loss_mask[j] == 1`` iff ``tokens[j]`` is a supervised
target. At load time, within one conversation of length ``n``:

* ``labels[j] = tokens[j + 1]`` for ``j < n - 1``, with weight taken from ``loss_mask[j + 1]``;
* ``labels[n - 1] = IGNORE_INDEX``: a conversation's last position has no target;
* nothing crosses a conversation boundary (the last token of conversation A never predicts the
  first token of conversation B).

Worked example, two conversations packed together, ``cu_seqlens = [0, 4, 7]``::

    index       0   1   2   3 | 4   5   6
    tokens     10  11  12  13 | 20  21  22
    loss_mask   0   0   1   1 | 0   1   0
    next token 11  12  13  -- | 21  22  --      (-- : end of conversation, no next token)
    target      0   1   1   0 | 1   0   0       (= loss_mask shifted left by one, per conversation)
    labels     --  12  13  -- | 21  --  --      (-- = IGNORE_INDEX)

Position 3 has no target (end of conversation A; token 20 belongs to B), position 6 neither;
positions 0 and 5 predict unsupervised tokens (11: user text, 22: not supervised).

Loss weights (``loss_weights``): the loss of a batch is ``sum(w * l) / sum(w)``, both sums over the
*global* batch (all micro-batches and data-parallel ranks), where ``l`` is the per-position
cross-entropy. Modes:

* ``token``:    ``w = 1`` per supervised target;
* ``turn``:     each run of consecutive supervised targets (one assistant turn) weighs 1 in total,
  i.e. ``1 / len(run)`` per target;
* ``sequence``: each conversation weighs 1 in total, ``1 / (targets in the conversation)``.

For the example above: token ``[0,1,1,0 | 1,0,0]``; turn ``[0,.5,.5,0 | 1,0,0]``; sequence
``[0,.5,.5,0 | 1,0,0]`` (A has one run of two targets, B one target).
"""

from __future__ import annotations

import typing

import numpy as np

IGNORE_INDEX = -100
"""Label value of a position without a target (cross-entropy ignores it)."""

LossMode = typing.Literal["token", "turn", "sequence"]
LOSS_MODES = typing.get_args(LossMode)  # training.loss_normalization takes these
"""Valid ``mode`` values of :func:`loss_weights`."""


def _check_cu_seqlens(cu_seqlens: np.ndarray, length: int) -> np.ndarray:
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    if cu.ndim != 1 or cu.size < 1 or cu[0] != 0 or cu[-1] != length or np.any(np.diff(cu) < 0):
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at the token count {length}; "
            f"got {cu.tolist()[:8]}{'...' if cu.size > 8 else ''}"
        )
    return cu


def target_mask(loss_mask: np.ndarray, cu_seqlens: np.ndarray) -> np.ndarray:
    """Boolean ``[T]``: position ``j`` has a supervised target (``loss_mask[j+1]`` of the same
    conversation). ``loss_mask`` is the stored per-token mask, ``cu_seqlens`` real lengths."""
    mask = np.asarray(loss_mask).astype(bool)
    cu = _check_cu_seqlens(cu_seqlens, mask.shape[0])
    out = np.zeros_like(mask)
    out[:-1] = mask[1:]
    ends = cu[1:][cu[1:] > cu[:-1]] - 1  # last position of each non-empty conversation
    out[ends] = False
    return out


def shift_labels(tokens: np.ndarray, loss_mask: np.ndarray, cu_seqlens: np.ndarray) -> np.ndarray:
    """int64 ``[T]`` labels: ``tokens[j+1]`` where position ``j`` has a supervised target,
    ``IGNORE_INDEX`` elsewhere (unsupervised positions, conversation ends)."""
    tokens = np.asarray(tokens)
    has_target = target_mask(loss_mask, cu_seqlens)
    labels = np.full(tokens.shape[0], IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(has_target[:-1], tokens[1:], IGNORE_INDEX)
    return labels


def loss_weights(loss_mask: np.ndarray, cu_seqlens: np.ndarray, mode: str) -> np.ndarray:
    """float32 ``[T]`` weight of each position's loss under ``mode`` (see module docstring);
    zero wherever ``shift_labels`` gives ``IGNORE_INDEX``."""
    if mode not in LOSS_MODES:
        raise ValueError(f"loss mode must be one of {LOSS_MODES}, got {mode!r}")
    has_target = target_mask(loss_mask, cu_seqlens)
    weights = has_target.astype(np.float64)
    if mode == "token" or not has_target.any():
        return weights.astype(np.float32)
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    if mode == "sequence":
        conv_of = np.repeat(np.arange(cu.size - 1), np.diff(cu))
        groups = conv_of
    else:
        # A run starts at a target whose predecessor is not a target or lies in another
        # conversation. Targets never sit on a conversation's last position, so a run can only
        # continue across a boundary if the previous conversation's end were a target: it is not.
        starts = has_target & ~np.concatenate([[False], has_target[:-1]])
        groups = np.cumsum(starts) - 1
    counts = np.bincount(groups[has_target], minlength=int(groups.max()) + 1)
    weights[has_target] = 1.0 / counts[groups[has_target]]
    return weights.astype(np.float32)
