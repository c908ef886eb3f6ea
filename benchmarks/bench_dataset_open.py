"""What the integrity checks cost when a packed file set is opened (``PackedDataset(prefix)``).

    python benchmarks/bench_dataset_open.py --tokens 75_000_000 --out /tmp/open_bench

Writes a synthetic set (random token ids below ``--vocab-size``, conversations of 50-4000 tokens
packed into ``--seq-length`` packs, ~5 bytes per token over the three parts), then opens it
``--repeats`` times and prints: the whole open, the integrity checks alone (``check_file_set``),
split into the index checks and the value pass, per GB of ``.bin`` data. Files come from the page
cache after the first open (a cold read from disk adds the disk's read time to the value pass).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_set(prefix: str, num_tokens: int, seq_length: int, vocab_size: int, seed: int = 0) -> None:
    from megatron_sft.data.indexed import PackedWriter, meta_path, report_path

    rng = np.random.default_rng(seed)
    writer = PackedWriter(prefix)
    written = 0
    while written < num_tokens:
        lengths, total = [], 0
        while True:
            n = int(rng.integers(50, 4000))
            if total + n > seq_length:
                break
            lengths.append(n)
            total += n
        tokens = [rng.integers(0, vocab_size, n, dtype=np.int32) for n in lengths]
        masks = [(rng.random(n) < 0.5).astype(np.uint8) for n in lengths]
        writer.add_pack(tokens, masks, [0] * len(lengths), list(range(writer.num_conversations,
                                                                      writer.num_conversations + len(lengths))))
        written += total
    writer.finalize()
    meta = {"tokenizer": "synthetic", "vocab_size": vocab_size, "seq_length": seq_length,
            "settings": {"inputs": ["synthetic.jsonl"]},
            "counts": {"num_packs": writer.num_packs, "num_conversations": writer.num_conversations,
                       "num_tokens": writer.num_tokens}}
    with open(meta_path(prefix), "w") as f:
        json.dump(meta, f)
    with open(report_path(prefix), "w") as f:
        json.dump({}, f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=75_000_000)
    parser.add_argument("--seq-length", type=int, default=16384)
    parser.add_argument("--vocab-size", type=int, default=151_936)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="/tmp/open_bench")
    args = parser.parse_args()

    from megatron_sft.data import integrity
    from megatron_sft.data.indexed import PackedDataset, indexed_paths, meta_path

    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, "set")
    if not os.path.exists(meta_path(prefix)):
        start = time.perf_counter()
        write_set(prefix, args.tokens, args.seq_length, args.vocab_size)
        print(f"wrote {prefix} in {time.perf_counter() - start:.1f} s")
    gb = sum(os.path.getsize(p) for p in indexed_paths(prefix) if p.endswith(".bin")) / 1e9
    ds = PackedDataset(prefix)
    print(f"{len(ds)} packs, {ds.num_tokens / 1e6:.1f}M tokens, {ds.conversation_lengths.size} conversations, "
          f"{gb:.3f} GB of .bin")
    parts = {"tokens": ds._tokens, "loss_mask": ds._loss_mask, "provenance": ds._provenance}
    paths = {part: f"{prefix}_{part}" for part in parts}
    timings = {"open": [], "checks": [], "values": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        PackedDataset(prefix)
        timings["open"].append(time.perf_counter() - start)
        start = time.perf_counter()
        integrity.check_file_set(prefix, paths, parts, ds.meta, 2)
        timings["checks"].append(time.perf_counter() - start)
        start = time.perf_counter()
        integrity.check_values(integrity._Problems(prefix), paths, parts, ds.meta["vocab_size"], 1)
        timings["values"].append(time.perf_counter() - start)
    for name, values in timings.items():
        best, median = min(values), float(np.median(values))
        print(f"{name:>7}: median {median * 1e3:7.1f} ms (best {best * 1e3:7.1f}) = {median / gb:.3f} s per GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
