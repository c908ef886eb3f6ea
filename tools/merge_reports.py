#!/usr/bin/env python
"""Merge the reports of a sharded preprocessing run into one.

    python tools/merge_reports.py data/sft            # reads data/sft_shard{0..N-1}.report.json

Writes PREFIX.report.json (``--out`` to choose): counts summed over the shards, drop reasons
merged, fill over all packs, and ``train_prefix``, the shard prefixes to train on as a blend:

    pretrain_sft.py ... --data.train_prefix=[data/sft_shard0,data/sft_shard1,...]

Exit code 0 on success, 2 when a shard report is missing or the reports are not the N shards of
one run (the message names the files).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sft.data.reports import format_summary, merge_reports, read_shard_reports  # noqa: E402
from megatron_sft.errors import SFTError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", help="the --output-prefix the shards were written with")
    p.add_argument("--out", help="merged report path (default: PREFIX.report.json)")
    args = p.parse_args(argv)
    try:
        merged = merge_reports(read_shard_reports(args.prefix))
    except SFTError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or f"{args.prefix}.report.json"
    with open(out, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=2)
    print(format_summary(merged))
    print(f"wrote {out}; train on the {len(merged['train_prefix'])} shards as a blend with")
    print(f"  --data.train_prefix=[{','.join(merged['train_prefix'])}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
