"""Loading: YAML files + ``--section.key=value`` overrides -> ``SFTConfig``, strictly (unknown keys
named with their file), every issue reported at once; ``load_section`` does the same for any
config dataclass (the data compiler's settings). ``--help`` text: ``config.docs``."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import typing
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml

from megatron_sft.errors import SFTError
from megatron_sft.config.checks import check_config
from megatron_sft.config.docs import UNIONS, field_docs, type_name
from megatron_sft.config.schema import ModelConfig, SFTConfig


class ConfigError(SFTError, ValueError):
    """Invalid user configuration; ``issues`` lists every problem found, each with its fix."""

    def __init__(self, issues: List[str]):
        self.issues = list(issues)
        lines = "\n".join(f"  - {issue}" for issue in self.issues)
        super().__init__(f"invalid configuration ({len(self.issues)} issue(s)):\n{lines}")


_INVALID = object()  # a value that failed conversion (already reported)


def load_config(
    paths: Union[str, Sequence[str], None],
    overrides: Sequence[str] = (),
    *,
    world_size: int = 1,
    has_cuda: bool = False,
    has_te: Optional[bool] = None,
) -> "SFTConfig":
    """Compose the run's config and check it for a job of ``world_size`` processes on a machine
    with or without CUDA and Transformer Engine (``has_te`` None: whether it is installed).

    Order, later wins key by key (sections merge, a list or scalar is replaced whole): the YAML
    files ``paths`` in the order given (a base recipe, then files of overrides), then the
    ``--section.key=value`` ``overrides``. Then, when ``checkpoint.pretrained`` holds a config.yaml
    (a converted HF model or a trainer checkpoint), its ``model:`` section fills the model section;
    a model value also given explicitly must equal it (``RUN_CHOICE_MODEL_KEYS`` excepted).
    Raises ConfigError listing every issue at once (unknown keys name their file)."""
    issues: List[str] = []
    layers = yaml_layers(paths)
    cli: dict = {}
    for dotted, value in parse_overrides(overrides, issues):
        _set_dotted(cli, dotted, value, issues)
    layers.append(("the command line", cli))
    raw: dict = {}
    origin: Dict[str, str] = {}  # dotted key -> the file (or command line) that set it last
    for source, layer in layers:
        layer = _known_keys(SFTConfig, layer, "", source, issues)
        _deep_merge(raw, layer)
        origin.update(dict.fromkeys(_leaf_paths(layer), source))
    if raw.get("model", {}) is None:  # ``model: null`` (e.g. in an overlay) means "no model section"
        del raw["model"]
    model_missing = not _take_pretrained_model(raw, origin, issues) and "model" not in raw
    build_issues: List[str] = []
    cfg = _build(SFTConfig, raw, "", build_issues)
    if model_missing:  # already reported once with its fix, not once per required model key
        build_issues = [i for i in build_issues if not i.startswith("missing required key 'model.")]
    issues.extend(build_issues)
    if not issues:  # cross-field checks need every field well typed
        issues.extend(check_config(cfg, world_size=world_size, has_cuda=has_cuda, has_te=has_te))
    if issues:
        raise ConfigError(issues)
    return cfg


def build_section(cls, raw: object, prefix: str, source: str):
    """One config section (a dataclass, e.g. ModelConfig) from a mapping, as strictly as
    ``load_config`` builds the whole tree: unknown keys (named with ``source``), missing keys and
    bad types are one ConfigError listing every issue. For tools that read one section."""
    return load_section(cls, [(source, raw)], prefix=prefix)


def load_section(cls, layers: Sequence[Tuple[str, object]], *, prefix: str = "",
                 fixes: Optional[Dict[str, str]] = None):
    """Dataclass ``cls`` from ``layers``, ``(source, mapping)`` pairs in order (a file path, a
    flag, "the command line"), merged as ``load_config`` merges: later wins key by key. Unknown
    keys are named with their source, a value of the wrong type with the source that set it last,
    a missing required key with ``fixes[key]`` when given (how to give it, e.g. the flag).
    Raises one ConfigError listing every issue."""
    issues: List[str] = []
    raw: dict = {}
    origin: Dict[str, str] = {}  # dotted key -> the source that set it last
    for source, layer in layers:
        if not isinstance(layer, dict):
            where = prefix.rstrip(".") or "the top level"
            issues.append(f"{source}: {where}: expected a mapping of {cls.__name__} fields, got {layer!r}")
            continue
        layer = _known_keys(cls, layer, prefix, source, issues)
        _deep_merge(raw, layer)
        origin.update(dict.fromkeys(_leaf_paths(layer, prefix), source))
    build_issues: List[str] = []
    section = _build(cls, raw, prefix, build_issues)
    issues.extend(_with_source(issue, origin, fixes or {}) for issue in build_issues)
    if issues:
        raise ConfigError(issues)
    return section


def yaml_layers(paths: Union[str, Sequence[str], None]) -> List[Tuple[str, dict]]:
    """``(path, mapping)`` of each YAML file, in order; one ConfigError naming every unreadable
    one (what would be missing from it is not reported: that would be noise)."""
    issues: List[str] = []
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    layers = [(path, _read_yaml(path, issues)) for path in paths]
    if issues:
        raise ConfigError(issues)
    return layers


_ISSUE_KEY = re.compile(r"^(missing required key )?'([^']+)'")  # the issues _build and _convert write


def _with_source(issue: str, origin: Dict[str, str], fixes: Dict[str, str]) -> str:
    """``issue`` prefixed with the source of the value it names, or followed by the fix of the
    required key it misses."""
    match = _ISSUE_KEY.match(issue)
    if not match:
        return issue
    dotted = re.sub(r"\[\d+\]", "", match.group(2))  # 'inputs[1]' was set with 'inputs'
    if match.group(1):
        return f"{issue}: {fixes[dotted]}" if dotted in fixes else issue
    while dotted not in origin and "." in dotted:  # set as a whole section (``format_keys: {}``)
        dotted = dotted.rsplit(".", 1)[0]
    return f"{origin[dotted]}: {issue}" if dotted in origin else issue


def _read_yaml(path: str, issues: List[str]) -> dict:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        issues.append(f"cannot read config file {path}: {e}")
        return {}
    if not isinstance(raw, dict):
        issues.append(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
        return {}
    return raw


def _known_keys(cls, raw: object, prefix: str, source: str, issues: List[str]) -> object:
    """``raw`` without the keys dataclass ``cls`` lacks (at any depth), each reported as coming
    from ``source`` (a file path or the command line). Values are left for ``_build`` to check."""
    if not isinstance(raw, dict):
        return raw
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in raw.items():
        if key not in hints:
            issues.append(f"{source}: {_unknown_key(prefix, key, list(hints))}")
            continue
        section = next((t for t in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(t)), None)
        out[key] = _known_keys(section, value, f"{prefix}{key}.", source, issues) if section else value
    return out


def _unknown_key(prefix: str, key: object, known: List[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(known)}"
    return f"unknown key '{prefix}{key}'{hint}"


def _deep_merge(base: dict, layer: dict) -> None:
    """Merge ``layer`` into ``base`` in place: mappings key by key, anything else replaced whole."""
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _leaf_paths(raw: dict, prefix: str = ""):
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            yield from _leaf_paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


# --------------------------------------------------------------------------------------------
# The model section of checkpoint.pretrained (a converted HF model or a trainer checkpoint).
# --------------------------------------------------------------------------------------------

RUN_CHOICE_MODEL_KEYS = ("attention_backend", "max_position_embeddings")
"""Model keys that no weight depends on: a config may set them differently from the checkpoint's."""


def pretrained_config_file(directory: str) -> Optional[str]:
    """The config.yaml describing checkpoint ``directory``, or None: a converted dir and an
    ``iter_*`` dir hold one; a trainer save dir holds one in its latest iteration (the layout of
    ``megatron_sft.training.checkpoint``, read here without importing Megatron)."""
    pointer = os.path.join(directory, "latest_checkpointed_iteration.txt")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            text = f.read().strip()
        if text.isdigit():  # a bad pointer is the trainer's error to report, with its fix
            directory = os.path.join(directory, f"iter_{int(text):07d}")
    path = os.path.join(directory, "config.yaml")
    return path if os.path.isfile(path) else None


def _take_pretrained_model(raw: dict, origin: Dict[str, str], issues: List[str]) -> bool:
    """Fill ``raw["model"]`` from ``checkpoint.pretrained``'s config.yaml, reporting every
    explicit model value that differs from it. True when the model section came from there."""
    checkpoint = raw.get("checkpoint")
    pretrained = checkpoint.get("pretrained") if isinstance(checkpoint, dict) else None
    explicit = raw.get("model", {})
    if not pretrained and "model" not in raw:
        issues.append("no model section: give model: in a --config file, or --checkpoint.pretrained=DIR of a "
                      "converted model (tools/convert_hf_to_megatron.py writes DIR/config.yaml)")
    if not isinstance(pretrained, str) or not pretrained or not isinstance(explicit, dict):
        return False  # nothing to take (a wrong type is reported by _build)
    path = pretrained_config_file(pretrained)
    if path is None:
        required = {f.name for f in dataclasses.fields(ModelConfig) if f.default is dataclasses.MISSING}
        if not required <= set(explicit):
            why = "does not exist" if not os.path.isdir(pretrained) else "holds no config.yaml"
            issues.append(f"checkpoint.pretrained={pretrained} {why}, so it cannot give the model section: point it "
                          "at a tools/convert_hf_to_megatron.py output (or a trainer checkpoint), or give model:")
        return False
    read_issues: List[str] = []
    section = _read_yaml(path, read_issues).get("model")
    if read_issues or not isinstance(section, dict):
        issues.extend(read_issues or [f"{path} (checkpoint.pretrained) has no model: section: re-convert the "
                                      "model, or give model:"])
        return False
    section = _known_keys(ModelConfig, section, "model.", path, issues)
    merged = copy.deepcopy(section)
    _deep_merge(merged, explicit)
    issues.extend(_model_conflicts(section, merged, explicit, origin, path))
    raw["model"] = merged
    return True


def _model_conflicts(section: dict, merged: dict, explicit: dict, origin: Dict[str, str], path: str) -> List[str]:
    """Each model key given explicitly whose (typed) value differs from the checkpoint's."""
    hints = typing.get_type_hints(ModelConfig)
    conflicts = []
    for key in section:
        if key in RUN_CHOICE_MODEL_KEYS or key not in explicit:
            continue
        scratch: List[str] = []  # a value of the wrong type is reported once, by _build
        theirs = _convert(hints[key], section[key], f"model.{key}", scratch)
        ours = _convert(hints[key], merged[key], f"model.{key}", scratch)
        if scratch or theirs == ours:
            continue
        dotted = f"model.{key}"
        where = origin.get(dotted) or next((s for k, s in origin.items() if k.startswith(dotted + ".")), "config")
        conflicts.append(
            f"{dotted}={_plain(ours)!r} ({where}) conflicts with {_plain(theirs)!r} in {path}, the model of "
            f"checkpoint.pretrained: remove {dotted} from {where} (the model section comes from the checkpoint), "
            "or point checkpoint.pretrained at the model you mean")
    return conflicts


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def parse_overrides(args: Sequence[str], issues: List[str]) -> List[Tuple[str, object]]:
    """``["--training.lr=3e-4", "--data.seed", "7"]`` -> ``[("training.lr", 3e-4), ("data.seed", 7)]``.
    Values are parsed as YAML scalars/lists (``true``, ``[a, b]``, ``null``)."""
    out: List[Tuple[str, object]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            issues.append(f"override {arg!r}: expected --section.key=value (e.g. --training.lr=1e-4)")
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            if i >= len(args):
                issues.append(f"override --{key}: missing value (use --{key}=VALUE)")
                continue
            text = args[i]
            i += 1
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        out.append((key, value))
    return out


def _set_dotted(raw: dict, dotted: str, value: object, issues: List[str]) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            issues.append(f"override --{dotted}: '{part}' is not a section")
            return
        node = child
    node[parts[-1]] = value


def _build(cls, raw: object, prefix: str, issues: List[str]):
    """Build dataclass ``cls`` from a mapping, reporting unknown/missing keys and bad types."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        issues.append(f"{where}: expected a mapping of {cls.__name__} fields, got {raw!r}")
        raw = {}
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    reported = len(issues)
    for key in raw:
        if key not in known:  # load_config drops these first, naming their file
            issues.append(_unknown_key(prefix, key, list(known)))
    kwargs = {}
    for name, f in known.items():
        dotted = f"{prefix}{name}"
        if name in raw:
            value = _convert(hints[name], raw[name], dotted, issues)
            kwargs[name] = None if value is _INVALID else value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, dotted + ".", issues)
            else:
                doc = field_docs(cls).get(name, "")
                issues.append(f"missing required key '{dotted}' ({doc.splitlines()[0] if doc else name})")
                kwargs[name] = None
    try:
        return cls(**kwargs)
    except SFTError as err:  # the section's own check, e.g. FormatKeys' role_map targets
        issues.append(f"{where}: {err}")
    except (TypeError, ValueError, AttributeError):
        if len(issues) == reported:  # not a None standing in for a reported value: a bug
            raise
    return None


def _convert(tp, value, dotted: str, issues: List[str]):
    """Convert one YAML value to type ``tp``; report and return _INVALID when it does not fit."""
    result = _try_convert(tp, value, dotted, issues)
    if result is _INVALID:
        issues.append(f"'{dotted}' = {value!r}: expected {type_name(tp)}")
    return result


def _try_convert(tp, value, dotted: str, issues: List[str]):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in UNIONS:
        if value is None:
            return None if type(None) in args else _INVALID
        for arg in args:
            if arg is type(None):
                continue
            sub_issues: List[str] = []
            result = _try_convert(arg, value, dotted, sub_issues)
            if result is not _INVALID:
                issues.extend(sub_issues)
                return result
        return _INVALID
    if origin is Literal:
        return value if value in args else _INVALID
    if origin in (list, List):
        if not isinstance(value, list):
            return _INVALID
        items = [_try_convert(args[0], v, f"{dotted}[{i}]", issues) for i, v in enumerate(value)]
        return _INVALID if any(v is _INVALID for v in items) else items
    if origin is tuple:
        return _to_tuple(args, value, dotted, issues)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, dotted + ".", issues) if isinstance(value, dict) else _INVALID
    if tp is bool:
        return value if isinstance(value, bool) else _INVALID
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if tp is float:
        return _to_float(value)
    if tp is str:
        return value if isinstance(value, str) else _INVALID
    raise TypeError(f"unsupported config field type {tp} at {dotted}")  # a bug in this module


def _to_tuple(args: tuple, value, dotted: str, issues: List[str]):
    # YAML has no tuples: a list, or a mapping as its (key, value) pairs (FormatKeys.role_map).
    if isinstance(value, dict):
        value = [list(pair) for pair in value.items()]
    if not isinstance(value, (list, tuple)):
        return _INVALID
    item_types = [args[0]] * len(value) if args[-1:] == (Ellipsis,) else list(args)
    if len(item_types) != len(value):
        return _INVALID
    items = [_try_convert(t, v, f"{dotted}[{i}]", issues) for i, (t, v) in enumerate(zip(item_types, value))]
    return _INVALID if any(v is _INVALID for v in items) else tuple(items)


def _to_float(value):
    # PyYAML reads "1e-5" (no dot) as a string: accept any string float() accepts.
    if isinstance(value, bool):
        return _INVALID
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return _INVALID
    return _INVALID


def config_to_dict(cfg) -> dict:
    """The resolved config as plain YAML-able data (what is printed and saved as config.yaml)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)

