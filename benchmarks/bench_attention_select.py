#!/usr/bin/env python
"""Host time of Transformer Engine's THD attention call per micro-batch, and what keeps its
backend selection cached (GPU; Transformer Engine installed):

    python benchmarks/bench_attention_select.py [--tokens 32768] [--calls 12] [--documents N]

TE's ``DotProductAttention`` re-runs its backend selection whenever its attention parameters differ
from the previous call's; for packed micro-batches they include the number of documents, the
number of tokens and ``max_seqlen``, which change with every micro-batch. Three layouts of the same
documents, each call a new pack (Llama-3.2-1B attention: 32 heads, 8 KV groups, head dim 64):

- ``as_built``: cu_seqlens and max_seqlen as the micro-batch builder makes them today;
- ``repeat``: ``as_built`` of the first pack at every call (parameters never change: the floor);
- ``fixed_bound``: max_seqlen = the pack length (a bound; the kernels read cu_seqlens);
- ``fixed_shape``: also the document count padded with empty documents to a fixed count.

Prints, per layout, the host time of the forward call (median and max over calls after the
first, GPU work queued but not waited for), the wall of forward + backward waited for (and the
causal attention TFLOP/s it makes, counted as ``training/flops.py`` counts them), and for the last two the largest difference of the
output and of dq/dk/dv on real tokens against ``as_built`` (same inputs)."""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def doc_lengths(rng, total: int, documents: int = 0) -> list:
    """Random conversation lengths that fill ``total`` tokens (``documents`` of them, or 8-40)."""
    n = documents or int(rng.integers(8, 41))
    if n == 1:
        return [total]
    cuts = np.sort(rng.choice(np.arange(1, total), n - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]])).tolist()


def layout(lengths: list, total: int, kind: str, max_docs: int):
    real = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    padded = real.copy()
    padded[-1] = total
    max_seqlen = int(max(np.diff(padded)))
    if kind in ("fixed_bound", "fixed_shape"):
        max_seqlen = total
    if kind == "fixed_shape":
        extra = max_docs - len(lengths)
        real = np.concatenate([real, np.full(extra, real[-1], np.int32)])
        padded = np.concatenate([padded, np.full(extra, padded[-1], np.int32)])
    cuda = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
    return cuda(real), cuda(padded), max_seqlen


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--max-docs", type=int, default=64)
    parser.add_argument("--documents", type=int, default=0, help="documents per pack (default: 8-40 at random)")
    args = parser.parse_args(argv)
    from transformer_engine.pytorch import DotProductAttention

    heads, groups, dim, total = 32, 8, 64, args.tokens
    attn = DotProductAttention(heads, dim, num_gqa_groups=groups, attn_mask_type="padding_causal",
                               qkv_format="thd", attention_dropout=0.0).cuda()
    rng = np.random.default_rng(0)
    packs = [doc_lengths(rng, total - int(rng.integers(0, 512)), args.documents) for _ in range(args.calls)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(total, groups, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(total, groups, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad_out = torch.randn(total, heads * dim, device="cuda", dtype=torch.bfloat16, generator=gen)

    results = {}
    for kind in ("as_built", "repeat", "fixed_bound", "fixed_shape"):
        host_ms, wall_ms, outputs = [], [], []
        for lengths in packs:
            if kind == "repeat":
                lengths = packs[0]
            real, padded, max_seqlen = layout(lengths, total, kind, args.max_docs)
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = attn(qq, kk, vv, cu_seqlens_q=real, cu_seqlens_kv=real, cu_seqlens_q_padded=padded,
                       cu_seqlens_kv_padded=padded, max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
            host_ms.append((time.perf_counter() - start) * 1e3)
            out.backward(grad_out)
            torch.cuda.synchronize()
            wall_ms.append((time.perf_counter() - start) * 1e3)
            keep = torch.cat([torch.arange(int(s), int(s) + n, device="cuda")
                              for s, n in zip(padded[:len(lengths)].tolist(), lengths)])
            outputs.append([t[keep].float() for t in (out, qq.grad, kk.grad, vv.grad)])
        torch.cuda.synchronize()
        results[kind] = outputs
        later = host_ms[1:]
        line = (f"{kind:12s} host ms per call: first {host_ms[0]:7.2f}  median {statistics.median(later):6.2f}  "
                f"max {max(later):6.2f}  fwd+bwd wall median {statistics.median(wall_ms[1:]):6.2f} ms")
        # Causal FLOPs as the trainer counts them (flops.py): 3 x 4 n d per query-key pair.
        tflops = [12 * heads * dim * sum(n * (n + 1) // 2 for n in (packs[0] if kind == "repeat" else lengths))
                  / (ms * 1e9) for lengths, ms in zip(packs[1:], wall_ms[1:])]
        line += f"  ({statistics.median(tflops):5.1f} TFLOP/s)"
        if kind not in ("as_built", "repeat"):
            diffs = [max((a - b).abs().max().item() for a, b in zip(x, y))
                     for x, y in zip(results["as_built"], outputs)]
            line += f"  max |diff| vs as_built (out, dq, dk, dv): {max(diffs):.3g}"
        print(line, flush=True)
    if args.documents == 1:  # the same single document as one dense causal sequence (bshd), for comparison
        dense = DotProductAttention(heads, dim, num_gqa_groups=groups, attn_mask_type="causal", qkv_format="bshd",
                                    attention_dropout=0.0).cuda()
        wall_ms = []
        for (n,) in packs:
            qq, kk, vv = (t[:n].unsqueeze(0).detach().requires_grad_() for t in (q, k, v))
            torch.cuda.synchronize()
            start = time.perf_counter()
            dense(qq, kk, vv).backward(grad_out[:n].unsqueeze(0))
            torch.cuda.synchronize()
            wall_ms.append((time.perf_counter() - start) * 1e3)
        tflops = [12 * heads * dim * n * (n + 1) // 2 / (ms * 1e9) for (n,), ms in zip(packs[1:], wall_ms[1:])]
        print(f"{'bshd_dense':12s} fwd+bwd wall median {statistics.median(wall_ms[1:]):6.2f} ms  "
              f"({statistics.median(tflops):5.1f} TFLOP/s)", flush=True)


if __name__ == "__main__":
    main()
