"""What the config says about itself: the docstring under each field, type names and the
``--help`` text built from them (the trainer's, the data compiler's)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Dict, List, Literal, Union

UNIONS = (Union, types.UnionType)  # Optional[int] and, in modules with PEP 604 hints, int | None


def type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in UNIONS:
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, List):
        return f"a list of {type_name(args[0])}"
    if origin is tuple:
        return f"a list of {type_name(args[0])}" if args[-1:] == (Ellipsis,) else f"a list ({', '.join(map(type_name, args))})"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def field_docs(cls) -> Dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (parsed from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def config_help(cls=None, prefix: str = "") -> str:
    """``--help`` text: every ``--section.key`` with its type, default and docstring."""
    if cls is None:
        from megatron_sft.config.schema import SFTConfig
        cls = SFTConfig
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n[{prefix}{f.name}] {inspect.cleandoc(tp.__doc__ or '')}")
            lines.append(config_help(tp, f"{prefix}{f.name}."))
            continue
        lines.append(f"  --{prefix}{f.name} ({field_summary(tp, f)})")
        lines.extend("      " + line for line in docs.get(f.name, "").splitlines())
    return "\n".join(lines)


def field_summary(tp, f: dataclasses.Field) -> str:
    """``"int; default 1"`` or ``"a list of str; required"``: field ``f`` of type ``tp`` in help."""
    if f.default is not dataclasses.MISSING:
        default = f"default {f.default!r}"
    elif f.default_factory is not dataclasses.MISSING:
        default = "default {}"
    else:
        default = "required"
    return f"{type_name(tp)}; {default}"
