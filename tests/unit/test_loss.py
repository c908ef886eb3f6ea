"""Loss contract: weighted sums per micro-batch, Megatron's per-token normalisation over the
global batch, per-source reporting, NaN isolation at weight-0 positions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_sft.data.labels import loss_weights
from megatron_sft.training.loss import sft_loss_func, summarize, weighted_loss_sums


def test_sums_and_count():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    weight = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    source = torch.tensor([[0, 0, 1, -1]])
    loss_sum, count, report = sft_loss_func(loss, loss_weight=weight, source_index=source, num_sources=2)
    assert loss_sum.item() == 5.0 and count.dtype == torch.int32 and count.item() == 2
    # report: [loss_sum, count, src0 loss, src1 loss, src0 weight, src1 weight]
    assert report["sums"].tolist() == [5.0, 2.0, 2.0, 3.0, 1.0, 1.0]
    out = summarize(report["sums"], ["a", "b"])
    assert out.loss == 2.5 and out.per_source == {"a": 2.0, "b": 3.0}


def test_report_is_a_copy_megatron_may_divide_the_loss_in_place():
    loss = torch.tensor([[2.0, 4.0]], requires_grad=True)
    loss_sum, count, report = sft_loss_func(loss * 1, loss_weight=torch.ones(1, 2), source_index=None, num_sources=1)
    loss_sum /= 8  # what a schedule without per-token loss does
    assert report["sums"][0].item() == 6.0


def test_nan_at_weight_zero_does_not_leak_but_supervised_nan_does():
    loss = torch.tensor([[float("nan"), 1.0, float("inf")]])
    s, w, _ = weighted_loss_sums(loss, torch.tensor([[0.0, 1.0, 0.0]]), None, 1)
    assert s.item() == 1.0 and w.item() == 1.0
    s, _, _ = weighted_loss_sums(loss, torch.tensor([[1.0, 1.0, 0.0]]), None, 1)
    assert math.isnan(s.item())


@pytest.mark.parametrize("mode, expected_count", [("token", 5), ("turn", 3), ("sequence", 2)])
def test_count_is_a_whole_number_of_tokens_turns_or_conversations(mode, expected_count):
    # conversation A: targets at 1,2 and 4 (two turns); B: targets at 7,8 (one turn)
    loss_mask = np.array([0, 0, 1, 1, 0, 1, 0, 0, 1, 1], dtype=np.uint8)
    cu = np.array([0, 6, 10])
    w = torch.from_numpy(loss_weights(loss_mask, cu, mode)).unsqueeze(0)
    _, count, _ = sft_loss_func(torch.ones(1, 10), loss_weight=w, source_index=None, num_sources=1)
    assert count.item() == expected_count


def _micro_batches(seed=0):
    """8 micro-batches of one sequence each; supervised tokens 1 or 100 (very unequal)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(8):
        n = 100 if i % 2 else 1
        tokens = torch.randint(0, 16, (1, 128), generator=g)
        weight = torch.zeros(1, 128)
        weight[0, :n] = 1.0
        batches.append((tokens, weight))
    return batches


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))


def _per_token_loss(model, tokens):
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="none").unsqueeze(0)


def _megatron_style_grads(groups):
    """Each 'rank' runs its micro-batches with sft_loss_func, backward on the unscaled sums, then
    grads are summed over ranks (DP all-reduce) and divided by the summed count
    (finalize_model_grads)."""
    model = _model()
    total_count, total_report = torch.zeros((), dtype=torch.int32), 0
    for group in groups:
        for tokens, weight in group:
            out = _per_token_loss(model, tokens)
            loss_sum, count, report = sft_loss_func(out, loss_weight=weight[:, :-1], source_index=None, num_sources=1)
            loss_sum.backward()
            total_count += count
            total_report = total_report + report["sums"]
    grads = [p.grad / total_count for p in model.parameters()]
    return summarize(total_report, ["all"]).loss, grads


def test_one_global_batch_any_split_gives_the_global_token_mean():
    batches = _micro_batches()
    # reference: mean over all supervised tokens of the global batch
    model = _model()
    losses = torch.cat([_per_token_loss(model, t)[0] for t, _ in batches])
    weights = torch.cat([w[0, :-1] for _, w in batches])
    ref = (losses * weights).sum() / weights.sum()
    ref.backward()
    ref_grads = [p.grad for p in model.parameters()]

    layouts = {
        "1x8 micro-batches": [batches],
        "8 ranks x 1": [[b] for b in batches],
        "2 DP x 4": [batches[:4], batches[4:]],
    }
    for name, groups in layouts.items():
        loss, grads = _megatron_style_grads(groups)
        assert loss == pytest.approx(ref.item(), rel=1e-6), name
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, msg=name)
    # a mean of per-micro-batch means would weight the 1-token batches 100x: not what we do
    per_batch_means = torch.stack([(_per_token_loss(model, t)[0] * w[0, :-1]).sum() / w[0, :-1].sum()
                                   for t, w in batches]).mean()
    assert abs(per_batch_means.item() - ref.item()) > 1e-3
