"""The chunked supervised LM head equals the plain computation: logits at every selected
position, cross-entropy, weighted sum; gradients of the hidden states and the output weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_sft.data.labels import IGNORE_INDEX
from megatron_sft.model.lm_head import ChunkedVocabParallelCE, SupervisedTargets


def reference(hidden, weight, target, loss_weight):
    ce = F.cross_entropy(hidden @ weight.t(), target, reduction="none")
    return (ce * loss_weight).sum(), ce


def inputs(n=37, h=16, vocab=50, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, h, generator=g, dtype=dtype, requires_grad=True)
    target = torch.randint(0, vocab, (n,), generator=g)
    loss_weight = torch.rand(n, generator=g, dtype=torch.float32) + 0.5
    return hidden, weight, target, loss_weight


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_loss_and_gradients_equal_the_full_computation(chunk):
    hidden, weight, target, loss_weight = inputs()
    loss_sum, token_loss = ChunkedVocabParallelCE.apply(hidden, weight, target, loss_weight, chunk, None, True)
    (2.5 * loss_sum).backward()  # the incoming gradient scales both weight and input gradients
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_sum, ref_ce = reference(hidden, weight, target, loss_weight)
    (2.5 * ref_sum).backward()
    # fp32 arithmetic (Megatron's cross-entropy helpers compute in fp32): summation-order noise only.
    torch.testing.assert_close(token_loss, ref_ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_sum, ref_sum.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], weight.grad, rtol=1e-5, atol=1e-6)


def test_weight_gradient_goes_to_main_grad_in_fp32():
    """Under Megatron's DDP the weight has a fp32 ``main_grad``: the gradient is added there (not
    rounded to the parameter dtype first) and autograd gets none."""
    hidden, weight, target, loss_weight = inputs(dtype=torch.float32)
    weight.main_grad = torch.ones(weight.shape, dtype=torch.float32)
    loss_sum, _ = ChunkedVocabParallelCE.apply(hidden, weight, target, loss_weight, 8, None, True)
    loss_sum.backward()
    assert weight.grad is None
    w = weight.detach().clone().requires_grad_(True)
    reference(hidden.detach(), w, target, loss_weight)[0].backward()
    torch.testing.assert_close(weight.main_grad, 1.0 + w.grad, rtol=1e-5, atol=1e-5)


def test_no_targets_still_back_propagates_zeros():
    hidden, weight, target, loss_weight = inputs(n=0)
    loss_sum, token_loss = ChunkedVocabParallelCE.apply(hidden, weight, target, loss_weight, 4, None, True)
    loss_sum.backward()
    assert loss_sum.item() == 0.0 and token_loss.numel() == 0
    assert torch.count_nonzero(weight.grad) == 0


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, target, loss_weight = inputs()
    with torch.no_grad():
        loss_sum, _ = ChunkedVocabParallelCE.apply(hidden, weight, target, loss_weight, 8, None, False)
    assert loss_sum.item() == pytest.approx(reference(hidden, weight, target, loss_weight)[0].item(), rel=1e-5)


def test_targets_are_the_positions_with_weight():
    labels = torch.tensor([[5, IGNORE_INDEX, 7, 8, IGNORE_INDEX]])
    weight = torch.tensor([[1.0, 0.0, 0.5, 0.0, 0.0]])  # position 3 has a label but weight 0 (turn mode never does this)
    source = torch.tensor([[0, 0, 1, 1, -1]])
    t = SupervisedTargets.from_batch(labels, weight, source, chunk_tokens=3)
    assert t.positions.tolist() == [0, 2]
    assert t.labels.tolist() == [5, 7] and t.loss_weight.tolist() == [1.0, 0.5] and t.source_index.tolist() == [0, 1]
    assert t.to("cpu").chunk_tokens == 3
