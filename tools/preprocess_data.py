#!/usr/bin/env python
"""Chat data -> verified loss masks -> packed Megatron indexed files.

    python tools/preprocess_data.py --input data.jsonl --tokenizer PATH_OR_HF_NAME \
        --output-prefix out/sft --seq-length 16384 --workers 8 --on-error skip

Writes PREFIX_{tokens,loss_mask,provenance}.{bin,idx}, PREFIX.meta.json and PREFIX.report.json
(see megatron_sft/data/compiler.py). With --num-shards N --shard-index I (one SLURM array task
each: tools/launch/preprocess_array.sbatch) it writes shard I as PREFIX_shardI; merge the shards'
reports with tools/merge_reports.py PREFIX and train on the shards as a blend. Exit code 0 on
success, 1 when the run stopped (bad record under --on-error fail, unusable tokenizer or chat
template, nothing kept, output prefix exists without --overwrite, disk full / read-only / no
permission at the output), 2 for invalid flags or --config files.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sft.config.cli import settings_from_args, settings_parser  # noqa: E402
from megatron_sft.data.compiler import CompileConfig, CompileError, compile_dataset, format_summary  # noqa: E402
from megatron_sft.data.readers import MissingExtraError  # noqa: E402
from megatron_sft.errors import SFTError  # noqa: E402

ALIASES = {  # flags spelled otherwise than their settings, kept from before the generated ones
    "inputs": "--input",
    "format_keys.messages": "--messages-key",
    "format_keys.conversations": "--conversations-key",
    "format_keys.tools": "--tools-key",
}


def parse_args(argv=None) -> argparse.Namespace:
    intro, _, more = __doc__.partition("\n\n")
    parser = settings_parser(CompileConfig, intro, epilog=more.partition("\n\n")[2],  # not the example
                             aliases=ALIASES, comma_separated=("inputs", "mixture_ratios"))
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> CompileConfig:
    """The --config files in order, then the flags in order (later wins), built strictly, then
    checked across fields. Raises ConfigError or InputError (both SFTError), listing every issue."""
    config = settings_from_args(CompileConfig, args, ALIASES)
    config.validate()  # compile_dataset checks again; here a test can call it without compiling
    return config


def _skip_transformer_engine() -> None:
    """Make Megatron-Core import as on a machine without Transformer Engine. This process only
    writes Megatron's indexed files, and Megatron-Core imports TE whenever it is installed: on an
    H200 box ``import megatron.core`` took 17 s, 11 s of them TE's CUDA libraries, more than the
    encoding of 5M tokens with 16 workers (benchmarks/results/preprocess_scaling.md). Megatron-Core
    treats the ModuleNotFoundError this gives as "TE not installed"."""
    for name in ("transformer_engine", "transformer_engine_torch"):
        sys.modules.setdefault(name, None)


def main(argv=None) -> int:
    args = parse_args(argv)
    _skip_transformer_engine()
    # Megatron-Core warns on import about optional CUDA packages the preprocessing never uses.
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    try:
        report = compile_dataset(config_from_args(args))
    except (CompileError, MissingExtraError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except SFTError as err:  # settings, inputs, tokenizer: what the command line named
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(report))
    prefix = report["output_prefix"]
    print(f"wrote {prefix}_{{tokens,loss_mask,provenance}}.{{bin,idx}}, .meta.json, .report.json")
    return 0


if __name__ == "__main__":
    code = main()
    # Every output is closed and published by now; the interpreter's teardown of torch and
    # Megatron-Core would only add ~2 s to each run (a tenth of a 16-worker run on 5M tokens).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
