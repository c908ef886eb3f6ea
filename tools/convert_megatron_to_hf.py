#!/usr/bin/env python
"""Export a Megatron checkpoint (trainer save dir, one iter_* dir, or a converted dir) to a
Hugging Face model directory: safetensors shards + index, config.json, generation_config.json
(eos ids include the chat template's end-of-turn token) and the tokenizer with the chat template
used in training.

    python tools/convert_megatron_to_hf.py --megatron runs/sft/ckpt --out exported/sft-hf
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sft.config.cli import settings_from_args, settings_parser  # noqa: E402
from megatron_sft.conversion.convert import megatron_to_hf  # noqa: E402
from megatron_sft.conversion.settings import MegatronToHFSettings  # noqa: E402
from megatron_sft.errors import SFTError  # noqa: E402


def main(argv=None) -> int:
    args = settings_parser(MegatronToHFSettings, __doc__).parse_args(argv)
    try:
        s = settings_from_args(MegatronToHFSettings, args)
        out = megatron_to_hf(s.megatron, s.out, tokenizer=s.tokenizer, dtype=s.dtype,
                             max_shard_bytes=int(s.max_shard_gb * 1024**3), progress=s.progress)
    except SFTError as err:  # settings, conversion, hub name, checkpoint verification
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
