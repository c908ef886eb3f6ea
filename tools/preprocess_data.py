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
permission at the output), 2 for invalid flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sft.data.chat_masks import MASK_MODES  # noqa: E402
from megatron_sft.data.compiler import CompileConfig, CompileError, compile_dataset, format_summary  # noqa: E402
from megatron_sft.data.formats import FormatKeys  # noqa: E402
from megatron_sft.data.readers import MissingExtraError  # noqa: E402
from megatron_sft.errors import SFTError  # noqa: E402


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="input file(s), comma-separated; .jsonl/.json/.parquet/HF folder")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or Hugging Face name")
    p.add_argument("--output-prefix", required=True, help="output path prefix")
    p.add_argument("--seq-length", type=int, required=True, help="pack capacity in real tokens")
    p.add_argument("--chat-template", help="Jinja chat template file replacing the tokenizer's")
    p.add_argument("--mode", default="assistant", choices=MASK_MODES, help="supervised turns")
    p.add_argument("--workers", type=int, default=1, help="encoding processes (output identical for any value)")
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"], help="stop at the first bad record, or count and skip")
    p.add_argument("--overlength", default="drop", choices=["drop", "truncate"], help="conversations longer than --seq-length")
    p.add_argument("--mixture-ratios", type=_floats, help="one ratio per input, e.g. 1.0,0.5")
    p.add_argument("--pseudo-multiturn-prob", type=float, default=0.0, help="chance a single-turn conversation joins the previous one")
    p.add_argument("--pseudo-multiturn-max-turns", type=int, default=1, help="most single-turn conversations merged into one")
    p.add_argument("--seed", type=int, default=1234, help="seed of sampling, merging, packing and pack order")
    p.add_argument("--messages-key", default="messages", help="record key of OpenAI-style messages")
    p.add_argument("--conversations-key", default="conversations", help="record key of ShareGPT-style conversations")
    p.add_argument("--tools-key", default="tools", help="record key of the tool schemas")
    p.add_argument("--limit", type=int, help="read only the first N records")
    p.add_argument("--num-shards", type=int, default=1, help="split the run into N shards (one per SLURM array task)")
    p.add_argument("--shard-index", type=int, default=0,
                   help="shard to write (0..N-1): conversations whose first record index %% N is this; "
                   "output PREFIX_shard<index>")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing file set at --output-prefix (without it an existing one is an error)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> CompileConfig:
    return CompileConfig(
        inputs=[p for p in args.input.split(",") if p],
        tokenizer=args.tokenizer,
        output_prefix=args.output_prefix,
        seq_length=args.seq_length,
        chat_template=args.chat_template,
        mode=args.mode,
        workers=args.workers,
        on_error=args.on_error,
        overlength=args.overlength,
        mixture_ratios=args.mixture_ratios,
        pseudo_multiturn_prob=args.pseudo_multiturn_prob,
        pseudo_multiturn_max_turns=args.pseudo_multiturn_max_turns,
        seed=args.seed,
        format_keys=FormatKeys(messages=args.messages_key, conversations=args.conversations_key, tools=args.tools_key),
        limit=args.limit,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )


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
