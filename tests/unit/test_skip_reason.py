"""A skipped step names the value that is not finite (a NaN grad norm is not a 'non-finite loss')."""

import math

from megatron_sft.training.loop import skip_reason


def test_nan_grad_norm_with_a_finite_loss():
    reason = skip_reason(4.25, math.nan)
    assert reason == "non-finite grad_norm nan (the loss 4.25 is finite)"


def test_non_finite_loss():
    assert skip_reason(math.inf, math.nan) == "non-finite loss inf (no gradient norm computed)"
    assert skip_reason(math.nan, math.nan).startswith("non-finite loss nan")


def test_finite_values_rejected_by_the_optimizer():
    assert "rejected" in skip_reason(1.5, 2.0)
