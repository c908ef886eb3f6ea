#!/usr/bin/env python
"""Time the supervised head's chunk (logits GEMM, cross-entropy, gradients) on one GPU, eager
arithmetic against the compiled kernels (``training.fused_kernels``), same inputs:

    python benchmarks/bench_lm_head.py [--targets 32768] [--vocab 128256] [--hidden 2048] [--chunk 4096]

Prints milliseconds per call (forward that also computes the gradients, plus the backward scale),
peak memory, and the largest differences between the two. The GEMM FLOPs (3 x 2 x n x h x v) are
the same for both, so the difference is the elementwise cross-entropy passes and the fp32 weight
gradient accumulation."""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=32768)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    import megatron_sft.mcore  # noqa: F401
    from megatron_sft.model.lm_head import ChunkedVocabParallelCE

    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(args.targets, args.hidden, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, device="cuda", generator=gen) * 0.02).bfloat16().requires_grad_()
    target = torch.randint(0, args.vocab, (args.targets,), device="cuda", generator=gen)
    weight = torch.ones(args.targets, device="cuda")
    results = {}
    for fused in (False, True):
        def call():
            h.grad = w.grad = None
            loss, _ = ChunkedVocabParallelCE.apply(h, w, target, weight, args.chunk, None, True, fused)
            loss.backward()
            return loss
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.iters):
            loss = call()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / args.iters * 1e3
        flops = 6 * args.targets * args.hidden * args.vocab
        results[fused] = (loss.item(), h.grad.float().clone(), w.grad.float().clone())
        print(f"{'compiled' if fused else 'eager':9s} {ms:8.2f} ms  {flops / ms / 1e9:6.1f} TFLOP/s (GEMMs only)  "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:6.2f} GiB  loss {loss.item():.6f}", flush=True)
    (l0, h0, w0), (l1, h1, w1) = results[False], results[True]
    print(f"loss rel diff {abs(l1 - l0) / abs(l0):.2e}  grad_hidden max diff {(h1 - h0).abs().max():.2e} "
          f"(max {h0.abs().max():.2e})  grad_weight max diff {(w1 - w0).abs().max():.2e} (max {w0.abs().max():.2e})")


if __name__ == "__main__":
    main()
