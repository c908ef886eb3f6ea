#!/usr/bin/env python
"""Export a Megatron checkpoint (trainer save dir, one iter_* dir, or a converted dir) to a
Hugging Face model directory: safetensors shards + index, config.json, generation_config.json
(eos ids include the chat template's end-of-turn token) and the tokenizer with the chat template
used in training.

    python tools/convert_megatron_to_hf.py --megatron runs/sft/ckpt --out exported/sft-hf
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sft.conversion.convert import DTYPES, megatron_to_hf  # noqa: E402
from megatron_sft.errors import SFTError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron", required=True,
                        help="save dir (uses latest_checkpointed_iteration.txt), iter_* dir or converted dir")
    parser.add_argument("--out", required=True, help="output HF directory (must be new or empty)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to ship, a folder or hub name (default: the training data's, "
                             "else the converted one)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast weights (default: keep the checkpoint's dtype)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = megatron_to_hf(args.megatron, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                             max_shard_bytes=int(args.max_shard_gb * 1024**3), progress=not args.no_progress)
    except SFTError as err:  # conversion, hub name, checkpoint verification
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
