"""GPU checks of the compiled kernels: the supervised head's chunk kernels
(``training.fused_kernels``) give the loss and gradients of the eager arithmetic (Megatron's order
of operations), bf16 and fp32, with a last chunk of another length; the float64 gradient
sum of squares equals the CPU float64 sum; batch copies to the GPU do not wait for queued work."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(dtype, fused: bool, n=5000, vocab=32000, hidden=256, chunk=2048):
    import megatron_sft.mcore  # noqa: F401
    from megatron_sft.model.lm_head import ChunkedVocabParallelCE

    gen = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(n, hidden, device="cuda", generator=gen) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=gen) * 0.05).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    weight = torch.rand(n, device="cuda", generator=gen) + 0.5
    loss_sum, token_loss = ChunkedVocabParallelCE.apply(h, w, target, weight, chunk, None, True, fused)
    (loss_sum * 0.5).backward()
    return loss_sum.detach(), token_loss, h.grad.float(), w.grad.float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_chunk_kernels_equal_eager(dtype):
    eager = _run(dtype, fused=False)
    fused = _run(dtype, fused=True)
    loss_tol = 1e-5 if dtype == torch.float32 else 1e-4
    assert torch.allclose(fused[0], eager[0], rtol=loss_tol), (fused[0], eager[0])
    assert torch.allclose(fused[1], eager[1], rtol=loss_tol, atol=loss_tol)
    for got, want in zip(fused[2:], eager[2:]):
        # bf16: the eager weight gradient is rounded to bf16 per chunk, the fused one accumulates
        # in fp32, so they agree to bf16 resolution of the largest entries.
        scale = want.abs().max()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert (got - want).abs().max() <= tol * scale, ((got - want).abs().max(), scale)


def test_compiled_sum_of_squares_is_float64_exact():
    from megatron_sft.training.optimizer import sum_of_squares

    gen = torch.Generator(device="cuda").manual_seed(1)
    grads = [torch.randn(n, device="cuda", generator=gen) * scale
             for n, scale in ((3, 1.0), (70_001, 1e-3), (5_000_000, 1e-6), (1 << 20, 10.0))]
    got = sum_of_squares(grads, torch.device("cuda"))
    want = sum(float((g.cpu().double() ** 2).sum()) for g in grads)
    assert got.dtype == torch.float64
    assert abs(float(got) - want) <= 1e-12 * want, (float(got), want)


def test_batch_copies_to_the_gpu_do_not_wait_for_queued_work():
    """``data.batches.to_device`` goes through pinned memory: a copy from pageable memory would
    wait until the GPU drained its queue (the previous micro-batch's backward) before returning."""
    from megatron_sft.data.batches import to_device

    x = torch.arange(1 << 20)
    to_device(x, "cuda")  # first use: the pinned block is allocated and cached
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of work queued on the current stream
    queued = torch.cuda.Event()
    queued.record()
    y = to_device(x, "cuda")
    assert not queued.query(), "the copy waited for the queued GPU work"
    torch.cuda.synchronize()
    assert torch.equal(y.cpu(), x)
