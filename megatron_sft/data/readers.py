"""Streaming readers for chat datasets: JSONL, JSON, Parquet and ``datasets.save_to_disk`` folders.

This is the I/O edge of the data pipeline. It turns files into ``RawRecord``s (a parsed ``dict``
or a per-record ``RecordError``) and knows nothing about chat semantics; ``formats.py`` turns a
payload into a ``Conversation``. Import the public names from ``megatron_sft.data.formats``.

Record numbering, the contract the compiler's provenance relies on:
  * ``record_index`` counts records over the concatenation of all inputs in ``--input`` order
    (file 0's records, then file 1's ...), starting at 0; error records are counted too.
  * ``count_records(path)`` equals the number of records ``iter_records([path])`` yields.
  * In JSONL, blank (whitespace-only) lines are skipped and not counted; ``location`` keeps the
    physical 1-based line number (``data.jsonl:17``). In JSON lists, Parquet files and HF
    folders ``location`` is the 0-based row within that file (``data.parquet:#3``).

Lazy JSONL (``iter_records(..., parse_jsonl=False)``): the line's bytes travel unparsed in
``RawRecord.raw`` and ``RawRecord.parsed()`` (or :func:`parse_json_line`) decodes them later,
with exactly the errors an eager read gives. The compiler uses this to move JSON parsing out of
its single reading process into the encoding workers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from megatron_sft.errors import InputError, MissingInputError, SFTError

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PARQUET_BATCH_ROWS = 1024
_UTF8_BOM = b"\xef\xbb\xbf"

# Targets a source role may map to. "tool_call" means "an assistant message whose value is a
# JSON tool call" (ShareGPT's function_call).
ROLE_TARGETS = ("system", "user", "assistant", "tool", "tool_call")
DEFAULT_ROLE_MAP: tuple[tuple[str, str], ...] = (
    ("system", "system"),
    ("human", "user"),
    ("user", "user"),
    ("gpt", "assistant"),
    ("assistant", "assistant"),
    ("function_call", "tool_call"),
    ("observation", "tool"),
    ("tool", "tool"),
    ("function", "tool"),
)


class RecordError(SFTError, ValueError):
    """A record that cannot be used. ``reason`` is a snake_case key for the report's counts by
    reason; ``detail`` says where (message index, line) and what was found."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.reason, self.detail))


@dataclass(frozen=True)
class FormatKeys:
    """Key names of the input records (CLI flags map onto these fields).

    ``role_map`` maps source role names (OpenAI ``role`` or ShareGPT ``from`` values) onto
    system/user/assistant/tool, or onto ``tool_call`` (an assistant tool call whose value is JSON,
    ShareGPT's ``function_call``). A ``dict`` may be passed; it is stored as sorted pairs so the
    keys stay hashable. Unlisted roles are a ``RecordError("unknown_role")``.
    """

    messages: str = "messages"
    """Record key of an OpenAI-style message list (e.g. ``history`` for SWE-agent trajectories)."""
    conversations: str = "conversations"
    """Record key of a ShareGPT-style message list."""
    tools: str = "tools"
    """Record key of the tool schemas (a list, or a JSON string of one)."""
    role: str = "role"
    """Message key of the role in OpenAI-style messages."""
    content: str = "content"
    """Message key of the content in OpenAI-style messages."""
    from_: str = "from"
    """Message key of the role in ShareGPT-style messages."""
    value: str = "value"
    """Message key of the content in ShareGPT-style messages."""
    role_map: tuple[tuple[str, str], ...] = DEFAULT_ROLE_MAP
    """Source role name -> one of ROLE_TARGETS."""

    def __post_init__(self):
        pairs = self.role_map.items() if isinstance(self.role_map, Mapping) else self.role_map
        pairs = tuple(sorted((str(k), str(v)) for k, v in pairs))
        bad = [f"{k}->{v}" for k, v in pairs if v not in ROLE_TARGETS]
        if bad:
            raise InputError(f"role_map targets must be one of {ROLE_TARGETS}; got {', '.join(bad)}")
        object.__setattr__(self, "role_map", pairs)

    def roles(self) -> dict[str, str]:
        """The role map as a dict."""
        return dict(self.role_map)

    def with_roles(self, **extra: str) -> "FormatKeys":
        """A copy whose role map adds/overrides ``extra`` (e.g. ``bot="assistant"``)."""
        roles = self.roles()
        roles.update(extra)
        return FormatKeys(**{**self.__dict__, "role_map": roles})


@dataclass
class RawRecord:
    """One input record before normalisation: a parsed ``payload`` or an ``error``, never both."""

    source_index: int
    """Which input file (0-based, ``--input`` order)."""
    record_index: int
    """0-based record number over the concatenation of all inputs."""
    location: str
    """``path:line`` (JSONL, 1-based) or ``path:#row`` (JSON list, Parquet, HF; 0-based)."""
    payload: dict | None
    error: RecordError | None = field(default=None)
    raw: bytes | None = field(default=None)
    """The unparsed JSONL line (``parse_jsonl=False``); payload and error are then both None."""

    def parsed(self) -> "RawRecord":
        """This record with ``raw`` decoded into ``payload`` or ``error`` (itself when parsed)."""
        if self.raw is None:
            return self
        payload, error = parse_json_line(self.raw, self.location)
        return RawRecord(self.source_index, self.record_index, self.location, payload, error)


class MissingExtraError(SFTError, ImportError):
    """An optional package needed for an input (pyarrow, datasets) is not installed; the message
    names the file and the install command."""


def _optional(module: str, path: str):
    """Import ``module`` (pyarrow, datasets: the ``formats`` extra of setup.py) for reading
    ``path``; MissingExtraError when it is not installed."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise MissingExtraError(f"reading {path} needs {package}, which is not installed ({err}): install the "
                                "formats extra, pip install -e '.[formats]' in the megatron-sft checkout "
                                "(or pip install pyarrow datasets)") from None


def _kind(path: str) -> str:
    """The reader for ``path``; raises FileNotFoundError/ValueError naming it."""
    if not os.path.exists(path):
        raise MissingInputError(f"input not found: {path}")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")):
            splits = sorted(e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e)))
            example = os.path.join(path, splits[0] if splits else "train")
            raise InputError(f"{path} is a DatasetDict; pass one split folder, e.g. {example}")
        if not os.path.exists(os.path.join(path, "state.json")):
            raise InputError(f"{path} is a folder but not one written by datasets.save_to_disk (no state.json)")
        return "hf"
    lower = path.lower()
    if lower.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(".json"):
        return "json"
    if lower.endswith(".parquet"):
        return "parquet"
    raise InputError(
        f"unsupported input {path}: expected .jsonl/.ndjson, .json, .parquet or a datasets.save_to_disk folder"
    )


def count_records(path: str) -> int:
    """Number of records ``iter_records([path])`` yields. Parquet reads the footer, HF folders
    their length; JSONL scans lines (non-blank ones count); JSON parses the document."""
    path = os.fspath(path)
    kind = _kind(path)
    if kind == "parquet":
        pq = _optional("pyarrow.parquet", path)
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet bytes
            raise InputError(f"{path}: unreadable parquet file: {e}") from None
    if kind == "hf":
        return len(_load_hf(path))
    if kind == "json":
        rows = _load_json_document(path)
        if rows is not None:
            return len(rows)
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def iter_records(paths: list[str], keys: FormatKeys = FormatKeys(), parse_jsonl: bool = True) -> Iterator[RawRecord]:
    """Yield every record of ``paths`` in order (see the module docstring for numbering).

    Streams JSONL, Parquet (row batches) and HF folders (memory-mapped); a JSON document is loaded
    whole. A broken JSON line, non-UTF-8 bytes or a row that is not an object yields a RawRecord
    with ``error`` set and the stream continues. Parquet/HF: when any of the columns named by
    ``keys`` (messages, conversations, tools) exist, only those are read, so wide tables stay cheap.
    With ``parse_jsonl=False`` JSONL lines come unparsed in ``raw`` (see the module docstring).
    Raises FileNotFoundError/ValueError naming a missing or unreadable input before reading it, and
    MissingExtraError naming the file and ``pip install -e '.[formats]'`` when a Parquet file or HF
    folder needs pyarrow / datasets and they are not installed.
    """
    paths = [os.fspath(p) for p in paths]
    kinds = [_kind(p) for p in paths]  # fail on a bad path before yielding anything
    record_index = 0
    for source_index, (path, kind) in enumerate(zip(paths, kinds)):
        if kind == "jsonl" and not parse_jsonl:
            for location, line in _jsonl_lines(path):
                yield RawRecord(source_index, record_index, location, None, raw=line)
                record_index += 1
            continue
        if kind == "jsonl":
            rows = ((location, *parse_json_line(line, location)) for location, line in _jsonl_lines(path))
        elif kind == "json":
            rows = _iter_json(path)
        elif kind == "parquet":
            rows = _iter_parquet(path, keys)
        else:
            rows = _iter_hf(path, keys)
        for location, payload, error in rows:
            if error is None and not isinstance(payload, dict):
                payload, error = None, RecordError(
                    "not_an_object", f"{location}: expected a JSON object, got {type(payload).__name__}"
                )
            yield RawRecord(source_index, record_index, location, payload, error)
            record_index += 1


def parse_json_line(raw: bytes, location: str = "") -> tuple[dict | None, RecordError | None]:
    """(payload, None) or (None, error) for one JSONL line; error details start with
    ``location: `` when one is given. Bytes are decoded per line, so one bad line does not poison
    the rest."""
    where = f"{location}: " if location else ""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.start + 4]
        return None, RecordError("non_utf8", f"{where}byte {e.start} of the line is not UTF-8 ({bad!r})")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as e:
        return None, RecordError("invalid_json", f"{where}{e.msg} at column {e.colno}")
    if not isinstance(payload, dict):
        return None, RecordError("not_an_object", f"{where}expected a JSON object, got {type(payload).__name__}")
    return payload, None


def _jsonl_lines(path: str):
    """(location, line bytes) per non-blank line, a leading UTF-8 BOM removed."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM):]
            if not raw.strip():
                continue
            yield f"{path}:{line_no}", raw


def _load_json_document(path: str) -> list | None:
    """The rows of a .json file: a list, or ``[obj]`` for a single object. Returns None when the
    file is really JSON Lines (a common misnaming: "Extra data" after the first object)."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 (byte offset {e.start})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            return None
        raise InputError(f"{path}: invalid JSON document: {e.msg} at line {e.lineno} column {e.colno}") from None
    if isinstance(doc, dict):
        return [doc]
    if isinstance(doc, list):
        return doc
    raise InputError(f"{path}: a .json input must hold a list of objects or one object, got {type(doc).__name__}")


def _iter_json(path: str):
    rows = _load_json_document(path)
    if rows is None:  # JSON Lines under a .json name
        for location, line in _jsonl_lines(path):
            yield (location, *parse_json_line(line, location))
        return
    for i, row in enumerate(rows):
        yield f"{path}:#{i}", row, None


def _projection(column_names, keys: FormatKeys) -> list[str] | None:
    wanted = [c for c in (keys.messages, keys.conversations, keys.tools) if c in column_names]
    has_messages = keys.messages in wanted or keys.conversations in wanted
    return wanted if has_messages else None  # None: read everything so errors show what is there


def _iter_parquet(path: str, keys: FormatKeys):
    pq = _optional("pyarrow.parquet", path)

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet bytes
        raise InputError(f"{path}: unreadable parquet file: {e}") from None
    columns = _projection(pf.schema_arrow.names, keys)
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
        for payload in batch.to_pylist():
            yield f"{path}:#{row}", payload, None
            row += 1


def _load_hf(path: str):
    datasets = _optional("datasets", path)

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise InputError(f"{path}: unreadable datasets folder: {e}") from None
    if not isinstance(ds, datasets.Dataset):
        raise InputError(f"{path} holds a {type(ds).__name__}; pass one split folder")
    return ds


def _iter_hf(path: str, keys: FormatKeys):
    ds = _load_hf(path)
    columns = _projection(ds.column_names, keys)
    if columns is not None:
        ds = ds.select_columns(columns)
    for row, payload in enumerate(ds):  # Arrow-backed, memory-mapped: rows are read lazily
        yield f"{path}:#{row}", payload, None
