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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sft.config.cli import settings_from_args, settings_parser  # noqa: E402
from megatron_sft.conversion.convert import hf_to_megatron  # noqa: E402
from megatron_sft.conversion.settings import HFToMegatronSettings  # noqa: E402
from megatron_sft.errors import SFTError  # noqa: E402


def main(argv=None) -> int:
    args = settings_parser(HFToMegatronSettings, __doc__).parse_args(argv)
    try:
        s = settings_from_args(HFToMegatronSettings, args)
        cfg = hf_to_megatron(s.hf, s.out, tensor_model_parallel_size=s.tp, pipeline_model_parallel_size=s.pp,
                             dtype=s.dtype, layer_layout=s.layer_layout, progress=s.progress)
    except SFTError as err:  # settings, conversion, hub name, checkpoint verification
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {s.out}: {cfg.num_layers} layers, hidden {cfg.hidden_size}; "
          f"train with --checkpoint.pretrained={s.out} (the model section comes from {s.out}/config.yaml)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
