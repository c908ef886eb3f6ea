"""Lazy JSONL reading (``parse_jsonl=False``): lines travel unparsed and ``parsed()`` gives exactly
what an eager read gives, errors included; numbering and locations do not change."""

from __future__ import annotations

import json

from megatron_sft.data.readers import RecordError, iter_records, parse_json_line

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def _jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), b"", b"{broken", b"   ", b"[1, 2]",
             b'{"messages": "caf\xe9"}', json.dumps({**GOOD, "id": 3}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _as_tuples(records):
    out = []
    for r in records:
        error = (r.error.reason, r.error.detail) if r.error else None
        out.append((r.source_index, r.record_index, r.location, r.payload, error))
    return out


def test_lazy_lines_parse_like_an_eager_read(tmp_path):
    path = _jsonl(tmp_path)
    listed = tmp_path / "l.json"
    listed.write_text(json.dumps([GOOD, 5]))
    eager = list(iter_records([str(path), str(listed)]))
    lazy = list(iter_records([str(path), str(listed)], parse_jsonl=False))
    assert [r.raw is not None for r in lazy] == [True] * 5 + [False] * 2  # a .json document is parsed whole
    assert all(r.payload is None and r.error is None for r in lazy[:5])
    assert lazy[0].raw.startswith(b"{")  # the BOM is gone
    assert _as_tuples(r.parsed() for r in lazy) == _as_tuples(eager)
    assert [e for *_, e in _as_tuples(eager)] == [
        None, ("invalid_json", f"{path}:3: Expecting property name enclosed in double quotes at column 2"),
        ("not_an_object", f"{path}:5: expected a JSON object, got list"),
        ("non_utf8", f"{path}:6: byte 17 of the line is not UTF-8 (b'\\xe9\"}}\\n')"), None, None,
        ("not_an_object", f"{listed}:#1: expected a JSON object, got int")]
    assert eager[0].parsed() is eager[0]


def test_parse_json_line_without_location():
    assert parse_json_line(b'{"a": 1}') == ({"a": 1}, None)
    payload, error = parse_json_line(b"[]")
    assert payload is None and isinstance(error, RecordError)
    assert (error.reason, error.detail) == ("not_an_object", "expected a JSON object, got list")


def test_missing_optional_package_names_the_file_and_the_extra(tmp_path, monkeypatch):
    import sys

    import pytest

    from megatron_sft.data.readers import MissingExtraError, count_records

    parquet = tmp_path / "chats.parquet"
    parquet.write_bytes(b"PAR1")
    hf = tmp_path / "hf_split"
    hf.mkdir()
    (hf / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # "import pyarrow.parquet" raises ImportError
    monkeypatch.setitem(sys.modules, "datasets", None)
    for path, package in ((parquet, "pyarrow"), (hf, "datasets")):
        for read in (lambda: count_records(str(path)), lambda: list(iter_records([str(path)]))):
            with pytest.raises(MissingExtraError, match=rf"reading {path} needs {package}.*pip install -e '\.\[formats\]'"):
                read()
