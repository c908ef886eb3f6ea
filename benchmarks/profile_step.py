#!/usr/bin/env python
"""Where a training step's time goes: torch.profiler over a few steps of the real trainer (GPU).

    python benchmarks/profile_step.py --config yaml_configs/llama3.2_1b_16k.yaml \
        --data.train_prefix=DATA/train [--section.key=value ...] [--warmup 3] [--steps 2] [--trace out.json]

Prints the GPU time per kernel category (GEMM, attention, cross-entropy/softmax, elementwise and
norms, optimizer, communication, other), the 25 most expensive kernels, and the step wall time
against the GPU's busy time (a gap means the host is the bottleneck). Single process.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

CATEGORIES = [  # first match wins
    ("attention", r"flash|fmha|fused_attn|cudnn|attn"),
    ("gemm", r"gemm|xmma|cutlass|nvjet|cublas|sm90_|sm80_|matmul"),
    ("cross_entropy_softmax", r"cross_entropy|softmax|logsumexp|log_softmax"),
    ("optimizer", r"adam|multi_tensor|l2norm|foreach"),
    ("communication", r"nccl|allreduce|all_gather|reduce_scatter"),
    ("norm_rope_swiglu", r"norm|rope|rotary|swiglu|silu|gelu|bias"),
    ("copy_cast_fill", r"copy|cast|fill|memcpy|memset|cat|index|gather|scatter|transpose"),
    ("elementwise", r"elementwise|vectorized|reduce|unrolled"),
]


def category(name: str) -> str:
    lower = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, lower):
            return label
    return "other"


def run(argv) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--trace", help="write a Chrome trace here")
    parser.add_argument("--gaps", type=int, default=12, help="list this many of the longest GPU idle gaps")
    args, overrides = parser.parse_known_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    from megatron_sft.config import load_config
    from megatron_sft.runtime import initialize_distributed, setup_model_parallel, teardown_model_parallel
    from megatron_sft.training.inputs import source_names, train_batches
    from megatron_sft.training.loop import Trainer

    total = args.warmup + args.steps
    cfg = load_config(args.config, [*overrides, f"--training.train_steps={total}"], world_size=1,
                      has_cuda=torch.cuda.is_available())
    initialize_distributed()
    setup_model_parallel(cfg.parallel, seed=cfg.training.seed)
    try:
        trainer = Trainer(cfg)
        batches = train_batches(trainer._builder(trainer.train_sets), trainer.stream, 0, 1, cfg.data.num_workers)
        names = source_names(trainer.train_sets)
        for _ in range(args.warmup):
            trainer.train_step(next(batches), names)
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities, with_stack=args.gaps > 0) as prof:
            start = time.perf_counter()
            records = [trainer.train_step(next(batches), names) for _ in range(args.steps)]
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / args.steps
        report(prof, wall, records, args.steps)
        if args.gaps:
            report_gaps(prof, args.gaps)
        if args.trace:
            prof.export_chrome_trace(args.trace)
    finally:
        teardown_model_parallel()


def report(prof, wall: float, records, steps: int) -> None:
    kernels = defaultdict(float)
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us and event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.key] += device_us / 1e6 / steps
    by_category = defaultdict(float)
    for name, seconds in kernels.items():
        by_category[category(name)] += seconds
    busy = sum(kernels.values())
    print(f"step wall {wall:.3f} s, GPU busy {busy:.3f} s ({100 * busy / wall:.1f}%), "
          f"tokens/s {records[-1]['tokens_per_s_per_gpu']:.0f}, TFLOP/s {records[-1]['tflops_per_gpu']:.1f}, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print("\nGPU time per step by category:")
    for label, seconds in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"  {label:24s} {seconds * 1e3:9.1f} ms  {100 * seconds / busy:5.1f}%")
    print("\ntop kernels (ms per step):")
    for name, seconds in sorted(kernels.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {seconds * 1e3:8.2f}  [{category(name)}] {name[:140]}")


def report_gaps(prof, top: int) -> None:
    """The longest stretches with no kernel on the GPU, each with what the host ran meanwhile: the
    CPU ops that started inside the gap and the Python frames (ours / Megatron) of the first one."""
    events = prof.events()
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    cpu = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                 key=lambda e: e.time_range.start)
    gaps, busy_until = [], None
    for k in kernels:
        if busy_until is not None and k.time_range.start - busy_until > 200:  # us
            gaps.append((k.time_range.start - busy_until, busy_until, k.time_range.start, k.name))
        busy_until = max(busy_until or 0, k.time_range.end)
    total = sum(g[0] for g in gaps)
    print(f"\nGPU idle gaps > 0.2 ms: {len(gaps)}, {total / 1e3:.1f} ms in the profiled steps")
    starts = [e.time_range.start for e in cpu]
    import bisect
    for length, begin, end, next_kernel in sorted(gaps, reverse=True)[:top]:
        inside = cpu[bisect.bisect_left(starts, begin):bisect.bisect_left(starts, end)]
        names = list(dict.fromkeys(e.name for e in inside))[:6]
        frames = [f for e in inside[:1] for f in (e.stack or []) if "megatron" in f or "benchmarks" in f][:4]
        print(f"  {length / 1e3:7.2f} ms before {next_kernel[:60]!r}: host ran {names}")
        for f in frames:
            print(f"           at {f[:150]}")


if __name__ == "__main__":
    run(sys.argv[1:])
