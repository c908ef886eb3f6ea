#!/usr/bin/env python
"""SwiGLU forward + backward on one GPU, Megatron's fused function (what ``training.fused_kernels``
uses, ``bias_activation_fusion``) against Transformer Engine's ``ops.SwiGLU`` (Megatron's
``use_te_activation_func``), same inputs:

    python benchmarks/bench_swiglu.py [--tokens 32768] [--ffn 8192] [--iters 20]

Both gate with the first half of the fc1 output: ``silu(a) * b``. Prints per implementation the
milliseconds of forward and of backward (forward + backward minus forward), the bandwidth they reach (forward reads 2 x ffn and
writes ffn values per token, backward reads 3 x ffn and writes 2 x ffn; bf16), and the largest
differences between the two outputs and input gradients. Needs CUDA and Transformer Engine."""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    import megatron_sft.mcore  # noqa: F401
    import transformer_engine.pytorch as te
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.tokens, 2 * args.ffn, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad = torch.randn(args.tokens, args.ffn, device="cuda", dtype=torch.bfloat16, generator=gen)
    implementations = {"megatron": lambda t: bias_swiglu_impl(t, None), "te": te.ops.SwiGLU()}
    results = {}
    for name, fn in implementations.items():
        leaf = x.detach().requires_grad_()

        def step():
            leaf.grad = None
            out = fn(leaf)
            out.backward(grad)
            return out

        forward_ms = timed(lambda: fn(leaf), args.iters)
        backward_ms = timed(step, args.iters) - forward_ms
        out = step()
        results[name] = (out.detach().float(), leaf.grad.float())
        value_bytes = 2 * args.tokens * args.ffn
        print(f"{name:9s} forward {forward_ms:7.3f} ms ({3 * value_bytes / forward_ms / 1e9:5.2f} TB/s)  "
              f"backward {backward_ms:7.3f} ms ({5 * value_bytes / backward_ms / 1e9:5.2f} TB/s)", flush=True)
    (out_m, grad_m), (out_t, grad_t) = results["megatron"], results["te"]
    print(f"max |diff| output {(out_m - out_t).abs().max().item():.3g}, "
          f"input gradient {(grad_m - grad_t).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
