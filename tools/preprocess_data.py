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
import dataclasses
import logging
import os
import sys
import types
import typing
import warnings

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sft.config import field_docs, field_summary, load_section, yaml_layers  # noqa: E402
from megatron_sft.data.compiler import CompileConfig, CompileError, compile_dataset, format_summary  # noqa: E402
from megatron_sft.data.readers import MissingExtraError  # noqa: E402
from megatron_sft.errors import SFTError  # noqa: E402

ALIASES = {  # flags spelled otherwise than their settings, kept from before the generated ones
    "inputs": "--input",
    "format_keys.messages": "--messages-key",
    "format_keys.conversations": "--conversations-key",
    "format_keys.tools": "--tools-key",
}


def _settings(cls=CompileConfig, prefix: str = ""):
    """``(dotted name, type, field, docstring)`` of every setting, nested sections flattened
    (``format_keys.messages``): what the flags, their help and the loader's checks come from."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _settings(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], f, docs.get(f.name, "")


def _flags(dotted: str, tp) -> list[str]:
    """``seq_length`` -> ``--seq-length``, ``format_keys.from_`` -> ``--format-keys.from``, an
    alias instead where there is one (not both: ``--inp`` must stay an unambiguous abbreviation);
    a bool setting gets both ``--NAME`` and ``--no-NAME``."""
    if dotted in ALIASES:
        return [ALIASES[dotted]]
    name = "--" + ".".join(part.strip("_").replace("_", "-") for part in dotted.split("."))
    return [name, "--no-" + name[2:]] if tp is bool else [name]


class _Setting(argparse.Action):
    """Records ``(flag as typed, dotted setting, raw text)`` in command-line order; the loader
    converts and checks the values, together with those of the --config files."""

    def __call__(self, parser, namespace, values, option_string=None):
        if self.nargs == 0:
            values = not option_string.startswith("--no-")
        namespace.settings = [*namespace.settings, (option_string, self.dest, values)]


def parse_args(argv=None) -> argparse.Namespace:
    intro, _, more = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=intro, epilog=more.partition("\n\n")[2],  # not the example
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                   help="settings by their names below with underscores (seq_length: 4096, inputs: [a.jsonl], "
                   "format_keys: {messages: history}); repeatable, later files win, flags win over files")
    p.set_defaults(settings=[])
    for dotted, tp, f, doc in _settings():
        summary = field_summary(tp, f)
        if dotted in ("inputs", "mixture_ratios"):
            summary += "; comma-separated"
        p.add_argument(*_flags(dotted, tp), dest=dotted, action=_Setting, nargs=0 if tp is bool else None,
                       default=argparse.SUPPRESS, metavar=dotted.rsplit(".", 1)[-1].strip("_").upper(),
                       help=f"{doc} ({summary})".replace("%", "%%"))
    return p.parse_args(argv)


def _flag_value(tp, text: str):
    """A flag's text as the value a YAML file would give: kept as is for a str setting, split at
    commas for a list (``--input a.jsonl,b.jsonl``), else read as a YAML scalar (``4096``, ``0.5``);
    a wrong type is left for the loader to report."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional: the flag gives a value
        tp = next(arg for arg in typing.get_args(tp) if arg is not type(None))
    if tp is str:
        return text
    if typing.get_origin(tp) is list:
        return [_flag_value(typing.get_args(tp)[0], part) for part in text.split(",") if part]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def config_from_args(args: argparse.Namespace) -> CompileConfig:
    """The --config files in order, then the flags in order (later wins), built strictly, then
    checked across fields. Raises ConfigError or InputError (both SFTError), listing every issue."""
    types = {dotted: tp for dotted, tp, _, _ in _settings()}
    layers = yaml_layers(args.config)
    for flag, dotted, text in args.settings:
        value = text if isinstance(text, bool) else _flag_value(types[dotted], text)
        for part in reversed(dotted.split(".")):
            value = {part: value}
        layers.append((flag, value))
    fixes = {dotted: f"pass {_flags(dotted, tp)[0]} or give {dotted}: in a --config file"
             for dotted, tp, f, _ in _settings()
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    config = load_section(CompileConfig, layers, fixes=fixes)
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
