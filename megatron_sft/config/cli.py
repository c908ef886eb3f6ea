"""Command lines generated from a settings dataclass (the data compiler's, the converters'): one
flag per field (``seq_length`` -> ``--seq-length``, nested sections dotted: ``--format-keys.role``,
a bool as ``--NAME``/``--no-NAME``), its help the field's docstring with type and default,
repeatable ``--config FILE.yaml`` files under the fields' own names, and every value converted
and checked by the strict loader (``load_section``), all issues at once. Flags win over files.

The trainer keeps its ``--section.key=value`` form (``loader.load_config``); both read the same
docstrings (``config.docs``)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import yaml

from megatron_sft.config.docs import field_docs, field_summary
from megatron_sft.config.loader import load_section, yaml_layers


def settings(cls, prefix: str = "") -> Iterator[Tuple[str, object, dataclasses.Field, str]]:
    """``(dotted name, type, field, docstring)`` of every setting of ``cls``, nested sections
    flattened (``format_keys.messages``)."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from settings(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], f, docs.get(f.name, "")


def flags(dotted: str, tp, aliases: Dict[str, str]) -> List[str]:
    """``seq_length`` -> ``--seq-length``, ``format_keys.from_`` -> ``--format-keys.from``, the
    alias instead where there is one (not both: an abbreviation such as ``--inp`` must stay
    unambiguous); a bool setting gets both ``--NAME`` and ``--no-NAME``."""
    if dotted in aliases:
        return [aliases[dotted]]
    name = "--" + ".".join(part.strip("_").replace("_", "-") for part in dotted.split("."))
    return [name, "--no-" + name[2:]] if tp is bool else [name]


class _Setting(argparse.Action):
    """Records ``(flag as typed, dotted setting, raw text)`` in command-line order; the loader
    converts and checks the values, together with those of the --config files."""

    def __call__(self, parser, namespace, values, option_string=None):
        if self.nargs == 0:
            values = not option_string.startswith("--no-")
        namespace.settings = [*namespace.settings, (option_string, self.dest, values)]


def settings_parser(cls, description: str, *, epilog: str = "", aliases: Optional[Dict[str, str]] = None,
                    comma_separated: Sequence[str] = ()) -> argparse.ArgumentParser:
    """An ArgumentParser with ``--config`` and one flag per setting of ``cls``; read the result
    with ``settings_from_args``. ``comma_separated``: list settings given as ``a,b,c``."""
    aliases = aliases or {}
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                   help="settings under their names below with underscores (e.g. "
                   f"{next(settings(cls))[0]}: ...); repeatable, later files win, flags win over files")
    p.set_defaults(settings=[])
    for dotted, tp, f, doc in settings(cls):
        summary = field_summary(tp, f) + ("; comma-separated" if dotted in comma_separated else "")
        p.add_argument(*flags(dotted, tp, aliases), dest=dotted, action=_Setting, nargs=0 if tp is bool else None,
                       default=argparse.SUPPRESS, metavar=dotted.rsplit(".", 1)[-1].strip("_").upper(),
                       help=f"{doc} ({summary})".replace("%", "%%"))
    return p


def flag_value(tp, text: str):
    """A flag's text as the value a YAML file would give: kept as is for a str setting, split at
    commas for a list (``--input a.jsonl,b.jsonl``), else read as a YAML scalar (``4096``, ``0.5``);
    a wrong type is left for the loader to report."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional: the flag gives a value
        tp = next(arg for arg in typing.get_args(tp) if arg is not type(None))
    if tp is str:
        return text
    if typing.get_origin(tp) is list:
        return [flag_value(typing.get_args(tp)[0], part) for part in text.split(",") if part]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def settings_from_args(cls, args: argparse.Namespace, aliases: Optional[Dict[str, str]] = None):
    """``cls`` from the --config files in order, then the flags in order (later wins), built
    strictly: one ConfigError (an SFTError) lists every unknown key, bad value and missing
    required setting, each naming its file or flag."""
    aliases = aliases or {}
    all_settings = list(settings(cls))
    types_by_name = {dotted: tp for dotted, tp, _, _ in all_settings}
    layers = yaml_layers(args.config)
    for flag, dotted, text in args.settings:
        value = text if isinstance(text, bool) else flag_value(types_by_name[dotted], text)
        for part in reversed(dotted.split(".")):
            value = {part: value}
        layers.append((flag, value))
    fixes = {dotted: f"pass {flags(dotted, tp, aliases)[0]} or give {dotted}: in a --config file"
             for dotted, tp, f, _ in all_settings
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return load_section(cls, layers, fixes=fixes)
