#!/usr/bin/env python
"""The float64 gradient norm's sum of squares over a model's gradients, two ways, same tensors:

    python benchmarks/bench_grad_norm.py [--layers 16] [--hidden 2048] [--ffn 8192] [--vocab 128256] [--device cuda]

- ``per_tensor``: what the trainer does (``training.optimizer.sum_of_squares``): on GPU one
  compiled float64 reduction per tensor, one launch and one add each;
- ``foreach64``: ``torch._foreach_norm(grads, 2, dtype=torch.float64)``, multi-tensor kernels over
  the whole list, then the squares of the per-tensor norms summed in float64.

Gradients are fp32 tensors of a Llama-shaped model (QKV, output projection, fc1, fc2 and two norms
per layer, embedding, output layer, final norm; ~1.5B elements at the defaults). Prints per method
the host time of the call (GPU work queued, not waited for), the wall until the value is on the
host, and the relative difference to the float64 sum computed on the CPU."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def gradient_shapes(layers: int, hidden: int, ffn: int, vocab: int, kv_hidden: int) -> list:
    per_layer = [(hidden + 2 * kv_hidden, hidden), (hidden, hidden), (2 * ffn, hidden), (hidden, ffn),
                 (hidden,), (hidden,)]
    return [(vocab, hidden)] + per_layer * layers + [(hidden,), (vocab, hidden)]


def foreach64(grads: list) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).square().sum()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--kv-hidden", type=int, default=512, help="query groups x head dim")
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    from megatron_sft.training.optimizer import sum_of_squares

    device = torch.device(args.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    shapes = gradient_shapes(args.layers, args.hidden, args.ffn, args.vocab, args.kv_hidden)
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device) for s in shapes]
    reference = float(sum_of_squares([g.cpu() for g in grads], torch.device("cpu")))
    print(f"{len(grads)} tensors, {sum(g.numel() for g in grads) / 1e9:.2f}B elements, device {device}")
    methods = {"per_tensor": lambda: sum_of_squares(grads, device), "foreach64": lambda: foreach64(grads)}
    for name, method in methods.items():
        for _ in range(3):
            float(method())
        host, wall = [], []
        for _ in range(args.iters):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            total = method()
            host.append((time.perf_counter() - start) * 1e3)
            value = float(total)
            wall.append((time.perf_counter() - start) * 1e3)
        print(f"{name:11s} host {statistics.median(host):8.3f} ms  wall {statistics.median(wall):8.3f} ms  "
              f"relative difference to CPU float64 {abs(value - reference) / reference:.2e}", flush=True)


if __name__ == "__main__":
    main()
