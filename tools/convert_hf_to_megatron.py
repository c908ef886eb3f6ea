#!/usr/bin/env python
"""Convert a Hugging Face Llama/Mistral/Qwen2/Qwen3 checkpoint into a Megatron dist checkpoint.

    python tools/convert_hf_to_megatron.py --hf Qwen/Qwen2.5-0.5B-Instruct --out ckpt/qwen2.5-0.5b
    python tools/convert_hf_to_megatron.py --hf /models/Llama-3.1-8B-Instruct --out ckpt/llama31_8b

--hf is a local folder or a Hugging Face hub name: a folder wins; a name is taken from the hub
cache (HF_HOME / HF_HUB_CACHE; works offline) or else downloaded (not with HF_HUB_OFFLINE=1).
OUT gets the model (key "model", canonical sharded layout: loads at any TP/PP), config.yaml with
the model section, the source config files and a tokenizer/ folder. Train from it with
``pretrain_sft.py --config yaml_configs/recipes/sft_converted_1gpu.yaml --checkpoint.pretrained=OUT``
(the model section comes from OUT/config.yaml).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sft.conversion.convert import DTYPES, hf_to_megatron  # noqa: E402
from megatron_sft.conversion.dist_io import LAYER_LAYOUTS  # noqa: E402
from megatron_sft.errors import SFTError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True,
                        help="HF model folder (config.json, *.safetensors, tokenizer) or hub name (org/model)")
    parser.add_argument("--out", required=True, help="output directory (must be new or empty)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size to check the model against")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size to check the model against")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast weights (default: keep the checkpoint's dtype)")
    parser.add_argument("--layer-layout", choices=LAYER_LAYOUTS, default="per-layer",
                        help="checkpoint keys decoder.layers.N.* (canonical) or stacked decoder.layers.* "
                             "(Megatron's default sharded state dict without non_homogeneous_layers)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = hf_to_megatron(args.hf, args.out, tensor_model_parallel_size=args.tp,
                             pipeline_model_parallel_size=args.pp, dtype=args.dtype,
                             layer_layout=args.layer_layout, progress=not args.no_progress)
    except SFTError as err:  # conversion, hub name, checkpoint verification
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {cfg.num_layers} layers, hidden {cfg.hidden_size}; "
          f"train with --checkpoint.pretrained={args.out} (the model section comes from {args.out}/config.yaml)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
