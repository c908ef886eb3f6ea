"""Readers and normalisation: every input format, key variant and RecordError reason."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from megatron_sft.data.formats import (
    REASONS,
    Conversation,
    FormatKeys,
    RecordError,
    count_records,
    iter_records,
    normalize_record,
)
from tests.conftest import fixture_path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _chat(user="hi", assistant="hello"):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _reason(payload, keys=FormatKeys()) -> RecordError:
    with pytest.raises(RecordError) as info:
        normalize_record(payload, keys)
    return info.value


# ---------------------------------------------------------------- readers


def test_jsonl_broken_line_blank_lines_and_locations(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        (json.dumps(_chat("a")) + "\n" + "\n" + '{"messages": [\n' + "   \n" + json.dumps(_chat("b")) + "\n").encode()
    )
    records = list(iter_records([str(path)]))
    assert [r.record_index for r in records] == [0, 1, 2]
    assert [r.location for r in records] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert records[0].error is None and records[0].payload == _chat("a")
    assert records[1].payload is None and records[1].error.reason == "invalid_json"
    assert records[1].error.detail.startswith(f"{path}:3: ")
    assert records[2].payload == _chat("b")
    assert count_records(str(path)) == 3


def test_jsonl_non_utf8_line_and_bom(tmp_path):
    path = tmp_path / "data.ndjson"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps(_chat("x")).encode() + b"\n" + b'{"messages": "\xff\xfe"}\n'
        + json.dumps(_chat("y")).encode() + b"\r\n"
    )
    records = list(iter_records([path]))
    assert [r.error.reason if r.error else None for r in records] == [None, "non_utf8", None]
    assert records[1].location == f"{path}:2"
    assert records[1].error.detail == f"{path}:2: byte 14 of the line is not UTF-8 (b'\\xff\\xfe\"}}')"
    assert records[2].payload == _chat("y")


def test_not_an_object_rows(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('[1, 2]\n"text"\n')
    listed = tmp_path / "b.json"
    listed.write_text(json.dumps([_chat(), 7]))
    records = list(iter_records([jsonl, listed]))
    assert [(r.location, r.error.reason if r.error else None) for r in records] == [
        (f"{jsonl}:1", "not_an_object"), (f"{jsonl}:2", "not_an_object"),
        (f"{listed}:#0", None), (f"{listed}:#1", "not_an_object"),
    ]
    assert _reason([1]).reason == "not_an_object"


def test_json_list_single_object_and_misnamed_jsonl(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([_chat("1"), _chat("2")]))
    single = tmp_path / "single.json"
    single.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}))
    misnamed = tmp_path / "lines.json"
    misnamed.write_text(json.dumps(_chat("3")) + "\n" + json.dumps(_chat("4")) + "\n")
    paths = [str(listed), str(single), str(misnamed)]
    records = list(iter_records(paths))
    assert [(r.source_index, r.record_index, r.location) for r in records] == [
        (0, 0, f"{listed}:#0"), (0, 1, f"{listed}:#1"), (1, 2, f"{single}:#0"),
        (2, 3, f"{misnamed}:1"), (2, 4, f"{misnamed}:2"),
    ]
    assert [count_records(p) for p in paths] == [2, 1, 2]


def test_missing_and_unreadable_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(iter_records([str(tmp_path / "nope.jsonl")]))
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [')
    with pytest.raises(ValueError, match="bad.json: invalid JSON document"):
        list(iter_records([str(bad)]))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(ValueError, match="latin.json: not UTF-8"):
        count_records(str(latin))
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3")
    with pytest.raises(ValueError, match="scalar.json: a .json input must hold"):
        list(iter_records([str(scalar)]))
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported input .*data.csv"):
        count_records(str(other))
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="folder but not one written by datasets.save_to_disk"):
        list(iter_records([str(folder)]))
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(ValueError, match="fake.parquet: unreadable parquet file"):
        list(iter_records([str(fake)]))


def test_bad_path_raises_before_any_record(tmp_path):
    good = _write_jsonl(tmp_path / "good.jsonl", [_chat()])
    stream = iter_records([good, str(tmp_path / "missing.jsonl")])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        next(stream)


def _tool_rows():
    return [
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Berlin"}'}}]},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "It is sunny."},
            ],
            "tools": json.dumps([{"name": "get_weather", "parameters": {"type": "object"}}]),
            "extra": "x" * 100,
        },
        {**_chat("q\r\n", " a "), "tools": None, "extra": "y"},
    ]


def test_parquet_streams_row_batches_and_projects_columns(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_sft.data import readers

    monkeypatch.setattr(readers, "_PARQUET_BATCH_ROWS", 2)
    rows = _tool_rows() * 3
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    assert count_records(str(path)) == 6
    records = list(iter_records([str(path)]))
    assert [r.location for r in records] == [f"{path}:#{i}" for i in range(6)]
    assert set(records[0].payload) == {"messages", "tools"}  # "extra" is not read
    conv = normalize_record(records[0].payload)
    assert conv.messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Berlin"}}}
    ]
    assert "tool_calls" not in conv.messages[0] and "name" not in conv.messages[2]  # Arrow's None fields
    assert conv.tools == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert normalize_record(records[1].payload).messages == _chat("q\r\n", " a ")["messages"]


def test_parquet_without_known_columns_reads_all(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "response": "r"}]), path)
    (record,) = iter_records([str(path)])
    assert record.payload == {"prompt": "p", "response": "r"}
    error = _reason(record.payload)
    assert error.reason == "unrecognized_format" and "keys present: prompt, response" in error.detail


def test_hf_save_to_disk_folder(tmp_path):
    import datasets

    folder = tmp_path / "hf"
    datasets.Dataset.from_list(_tool_rows()).save_to_disk(str(folder))
    assert count_records(str(folder)) == 2
    records = list(iter_records([str(folder)]))
    assert [r.location for r in records] == [f"{folder}:#0", f"{folder}:#1"]
    assert set(records[0].payload) == {"messages", "tools"}
    assert normalize_record(records[0].payload).messages[3] == {"role": "assistant", "content": "It is sunny."}
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_tool_rows())}).save_to_disk(str(dd))
    with pytest.raises(ValueError, match="is a DatasetDict; pass one split folder, e.g. .*dd/train"):
        count_records(str(dd))


def test_record_index_spans_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = _write_jsonl(tmp_path / "a.jsonl", [_chat("1"), _chat("2")])
    b = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([_chat("3")]), b)
    c = tmp_path / "c.json"
    c.write_text(json.dumps([_chat("4")]))
    records = list(iter_records([a, str(b), str(c)]))
    assert [(r.source_index, r.record_index) for r in records] == [(0, 0), (0, 1), (1, 2), (2, 3)]
    assert [normalize_record(r.payload).messages[0]["content"] for r in records] == ["1", "2", "3", "4"]


# ---------------------------------------------------------------- normalisation


def test_openai_messages_full_form():
    payload = {
        "messages": [
            {"role": "system", "content": "sys\r\n  "},
            {"role": "user", "content": "Weather in Paris?", "name": "alice"},
            {"role": "assistant", "content": None, "reasoning_content": "need a tool",
             "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "18C", "tool_call_id": "call_1", "name": "get_weather"},
            {"role": "assistant", "content": "18C in Paris.", "weight": 1},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
    }
    conv = normalize_record(payload)
    assert isinstance(conv, Conversation)
    assert conv.messages == [
        {"role": "system", "content": "sys\r\n  "},
        {"role": "user", "content": "Weather in Paris?", "name": "alice"},
        {"role": "assistant", "content": "", "reasoning_content": "need a tool",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                         "id": "call_1"}]},
        {"role": "tool", "content": "18C", "tool_call_id": "call_1", "name": "get_weather"},
        {"role": "assistant", "content": "18C in Paris.", "train": True},
    ]
    assert conv.tools == payload["tools"]


def test_tool_calls_as_json_string_and_legacy_function_call():
    payload = {"messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "ok", "tool_calls": json.dumps([{"name": "f", "arguments": {"x": 1}}])},
        {"role": "function", "content": "done", "name": "f"},
        {"role": "assistant", "content": "", "function_call": {"name": "g", "arguments": ""}},
        {"role": "function", "content": "done2", "name": "g"},
        {"role": "assistant", "content": "bye"},
    ]}
    messages = normalize_record(payload).messages
    assert messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]
    assert messages[2] == {"role": "tool", "content": "done", "name": "f"}
    assert messages[3]["tool_calls"] == [{"type": "function", "function": {"name": "g", "arguments": {}}}]


def test_sharegpt_function_call_merging():
    payload = {
        "system": "be brief",
        "conversations": [
            {"from": "human", "value": "add 1 and 2, and 3 and 4"},
            {"from": "gpt", "value": "Let me compute.", "weight": 1},
            {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 1, "b": 2}}'},
            {"from": "function_call", "value": '[{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}]'},
            {"from": "observation", "value": "3"},
            {"from": "function_call", "value": '{"name": "noop"}'},
            {"from": "observation", "value": "ok"},
            {"from": "gpt", "value": "3 and 7"},
        ],
        "tools": "[]",
    }
    conv = normalize_record(payload)
    add = lambda a, b: {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}  # noqa: E731
    assert conv.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "add 1 and 2, and 3 and 4"},
        {"role": "assistant", "content": "Let me compute.", "tool_calls": [add(1, 2), add(3, 4)], "train": True},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "noop", "arguments": {}}}]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "3 and 7"},
    ]
    assert conv.tools is None


def test_function_call_train_flags_when_merging():
    base = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "train": False}]
    merged = normalize_record({"conversations": base + [{"from": "function_call", "value": '{"name": "f"}'}]})
    assert merged.messages[1]["train"] is False
    adopted = normalize_record({"conversations": [
        base[0], {"from": "gpt", "value": "a"}, {"from": "function_call", "value": '{"name": "f"}', "train": False}]})
    assert adopted.messages[1]["train"] is False
    thinking = {"from": "function_call", "value": '{"name": "f"}', "reasoning_content": "why"}
    separate = normalize_record({"conversations": base + [thinking]})
    assert [m["role"] for m in separate.messages] == ["user", "assistant", "assistant"]
    assert separate.messages[2]["reasoning_content"] == "why" and "tool_calls" not in separate.messages[1]
    clash = [{"from": "function_call", "value": '{"name": "f"}', "weight": 1}]
    error = _reason({"conversations": base + clash})
    assert (error.reason, error.detail) == ("bad_train_flag", "message 2: function_call train=True differs from the assistant turn it joins")


def test_content_parts_llamafactory_and_openai():
    payload = {"messages": [
        {"role": "system", "content": [{"type": "text", "value": "S"}]},
        {"role": "user", "content": [{"type": "text", "text": "part1 "}, "part2", {"type": "text", "text": None, "value": "\n3"}]},
        {"role": "assistant", "content": [
            {"type": "reasoning", "value": "think "}, {"type": "reasoning", "value": "more"},
            {"type": "tool_call", "value": '{"name": "f", "arguments": {"k": "v"}}'},
            {"type": "tool_call", "value": {"name": "g", "arguments": "{}"}},
        ]},
        {"role": "tool", "content": [{"type": "text", "value": "r"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "done"}], "reasoning_content": "pre-"},
    ]}
    messages = normalize_record(payload).messages
    assert messages[0] == {"role": "system", "content": "S"}
    assert messages[1] == {"role": "user", "content": "part1 part2\n3"}
    assert messages[2] == {"role": "assistant", "content": "", "reasoning_content": "think more", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"k": "v"}}},
        {"type": "function", "function": {"name": "g", "arguments": {}}},
    ]}
    assert messages[4] == {"role": "assistant", "content": "done", "reasoning_content": "pre-"}


def test_extra_keys_dropped_and_tool_call_ids():
    payload = {"history": [
        {"role": "user", "content": "fix it", "agent": "main", "message_type": "observation"},
        {"role": "assistant", "content": "look", "thought": "look", "action": "ls", "agent": "main",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}]},
        {"role": "tool", "content": "a\r\nb", "tool_call_ids": ["c1"], "agent": "main"},
        {"role": "tool", "content": "c", "tool_call_ids": ["c1", "c2"]},
        {"role": "assistant", "content": "done"},
    ]}
    keys = FormatKeys(messages="history")
    messages = normalize_record(payload, keys).messages
    assert messages[0] == {"role": "user", "content": "fix it"}
    assert set(messages[1]) == {"role", "content", "tool_calls"}
    assert messages[2] == {"role": "tool", "content": "a\r\nb", "tool_call_id": "c1"}
    assert messages[3] == {"role": "tool", "content": "c"}
    assert _reason(payload).reason == "unrecognized_format"  # default key is "messages"


def test_configurable_keys_and_role_map():
    keys = FormatKeys(conversations="dialog", from_="speaker", value="text", tools="functions").with_roles(
        bot="assistant", person="user"
    )
    payload = {"dialog": [{"speaker": "person", "text": "q"}, {"speaker": "bot", "text": "a"}],
               "functions": [{"name": "f"}]}
    conv = normalize_record(payload, keys)
    assert conv.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert conv.tools == [{"type": "function", "function": {"name": "f"}}]
    role_keys = FormatKeys(messages="turns", role="speaker", content="utterance", role_map={"u": "user", "a": "assistant"})
    conv = normalize_record({"turns": [{"speaker": "u", "utterance": "q"}, {"speaker": "a", "utterance": "a"}]}, role_keys)
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    assert role_keys.role_map == (("a", "assistant"), ("u", "user"))
    assert hash(role_keys) == hash(FormatKeys(messages="turns", role="speaker", content="utterance",
                                              role_map=(("u", "user"), ("a", "assistant"))))
    with pytest.raises(ValueError, match="role_map targets must be one of"):
        FormatKeys(role_map={"bot": "robot"})


def test_messages_as_json_string_and_record_system():
    conv = normalize_record({"messages": json.dumps(_chat()["messages"]), "system": "S"})
    assert conv.messages[0] == {"role": "system", "content": "S"}
    same = {"messages": [{"role": "system", "content": "S"}] + _chat()["messages"], "system": "S"}
    assert len(normalize_record(same).messages) == 3
    assert _reason({**same, "system": "T"}).detail == "record-level 'system' differs from the system message 0"
    assert _reason({**same, "system": 5}).reason == "bad_content"


@pytest.mark.parametrize(
    "payload, reason, detail",
    [
        ({"text": "x"}, "unrecognized_format",
         "no 'messages' or 'conversations' key (keys present: text); pass --messages-key KEY (a list of role/content "
         "messages) or --conversations-key KEY (a list of from/value messages) naming the key that holds the conversation"),
        ({"id": 1, "history": [{"role": "user", "content": "q"}]}, "unrecognized_format",
         "no 'messages' or 'conversations' key (keys present: history, id); 'history' holds 'role'-keyed messages: "
         "pass --messages-key history"),
        ({"dialog": json.dumps([{"from": "human", "value": "q"}])}, "unrecognized_format",
         "no 'messages' or 'conversations' key (keys present: dialog); 'dialog' holds 'from'-keyed messages: "
         "pass --conversations-key dialog"),
        ({"messages": {"a": 1}}, "unrecognized_format", "'messages' must be a list of messages, got dict"),
        ({"messages": "[oops"}, "unrecognized_format", None),
        ({"messages": [{"content": "x"}]}, "unrecognized_format", "message 0: neither 'role' nor 'from' key (keys: content)"),
        ({"messages": ["hi"]}, "bad_message", "message 0: expected an object, got str"),
        ({"messages": [{"role": "user", "content": "q", "name": 3}]}, "bad_message", "message 0: name must be a string, got int"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "unknown_role", None),
        ({"messages": [{"role": "user", "content": 5}]}, "bad_content",
         "message 0: content must be a string or a list of parts, got int"),
        ({"messages": [{"role": "user", "content": [3]}]}, "bad_content", "message 0 part 0: expected an object, got int"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "bad_content",
         "message 0 part 0: text value must be a string"),
        ({"messages": [{"role": "user", "content": "q", "reasoning_content": "r"}]}, "bad_content",
         "message 0 (user) carries reasoning_content"),
        ({"messages": [{"role": "assistant", "content": "a", "reasoning_content": 1}]}, "bad_content",
         "message 0: reasoning_content must be a string"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]}, "unsupported_content",
         "message 0 part 0: type 'image_url' (supported: text, reasoning, tool_call)"),
        ({"messages": [{"role": "system", "content": ""}, {"role": "assistant", "content": "a"}]}, "empty_content",
         "message 0 (system): empty content"),
        ({"messages": [{"role": "user", "content": None}]}, "empty_content", "message 0 (user): empty content"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": ""}]},
         "empty_content", "message 2 (tool): empty content"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "reasoning_content": "r"}]},
         "empty_content", "message 1 (assistant): neither content nor tool_calls"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}, "no_assistant_turn",
         "no assistant message among 2 (roles: system, user)"),
        ({"messages": []}, "no_assistant_turn", "no assistant message among 0 (roles: none)"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{bad"}]}, "bad_tool_call", None),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "[]"}]}, "bad_tool_call",
         "message 1: empty list of tool calls"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]}, "bad_tool_call", None),
        ({"messages": [{"role": "assistant", "tool_calls": [{"name": "f", "arguments": "[1]"}]}]}, "bad_tool_call",
         "message 0: arguments of 'f' must be an object, got list"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"arguments": {}}]}]}, "bad_tool_call", "message 0: tool call without a name"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"type": "code", "name": "f"}]}]}, "bad_tool_call", None),
        ({"messages": [{"role": "assistant", "tool_calls": ["x"]}]}, "bad_tool_call", None),
        ({"messages": [{"role": "user", "content": "q", "tool_calls": [{"name": "f"}]}]}, "bad_tool_call",
         "message 0 (user) carries tool_calls"),
        ({**_chat(), "tools": "{not json"}, "bad_tools", None),
        ({**_chat(), "tools": {"name": "f"}}, "bad_tools", "tools must be a list, got dict"),
        ({**_chat(), "tools": [{"description": "x"}]}, "bad_tools", "tool 0: no name"),
        ({**_chat(), "tools": ["f"]}, "bad_tools", "tool 0: expected an object, got str"),
        ({**_chat(), "tools": [{"type": "retrieval"}]}, "bad_tools", "tool 0: type 'retrieval', expected 'function'"),
        ({"messages": [{"role": "assistant", "content": "a", "train": "yes"}]}, "bad_train_flag",
         "message 0: train must be true or false, got 'yes'"),
        ({"messages": [{"role": "assistant", "content": "a", "train": True, "weight": 0}]}, "bad_train_flag",
         "message 0: train=True disagrees with weight=0"),
        ({"messages": [{"role": "assistant", "content": "a", "weight": 0.5}]}, "bad_weight", "message 0: weight must be 0 or 1, got 0.5"),
        ({"messages": [{"role": "assistant", "content": "a", "weight": "1"}]}, "bad_weight", None),
        ({"messages": [{"role": "assistant", "content": "a", "weight": float("nan")}]}, "bad_weight", None),
    ],
)
def test_record_errors(payload, reason, detail):
    error = _reason(payload)
    assert error.reason == reason
    assert reason in REASONS
    if detail is not None:
        assert error.detail == detail
    assert str(error) == f"{reason}: {error.detail}"


def test_reason_list_is_pinned():
    # Each reason is raised by a test above; this pins the list the report documents.
    assert set(REASONS) == {
        "invalid_json", "non_utf8", "not_an_object", "unrecognized_format", "bad_message", "unknown_role",
        "bad_content", "unsupported_content", "empty_content", "no_assistant_turn", "bad_tool_call", "bad_tools",
        "bad_train_flag", "bad_weight",
    }


def test_unknown_role_detail_and_weights():
    error = _reason({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]})
    assert error.detail.startswith("message 1: role 'bot' (known: assistant, function, function_call, gpt, human")
    conv = normalize_record({"messages": [
        {"role": "user", "content": "q", "weight": 0},
        {"role": "assistant", "content": "a", "weight": 0.0, "train": False},
        {"role": "assistant", "content": "b", "weight": True},
    ]})
    assert [m.get("train") for m in conv.messages] == [False, False, True]


def test_record_error_pickles():
    import pickle

    error = pickle.loads(pickle.dumps(RecordError("bad_tools", "tool 0: no name")))
    assert (error.reason, error.detail) == ("bad_tools", "tool 0: no name")


# ---------------------------------------------------------------- real fixtures


def _normalize_all(path, keys=FormatKeys()):
    ok, errors = [], Counter()
    for record in iter_records([str(path)], keys):
        assert record.error is None, record.error
        try:
            ok.append(normalize_record(record.payload, keys))
        except RecordError as e:
            errors[(e.reason, e.detail, record.location)] += 1
    return ok, errors


def test_fixture_glaive_toolcall_sharegpt():
    path = fixture_path("datasets", "llamafactory_glaive_toolcall_en_demo.json")
    assert count_records(str(path)) == 300
    convs, errors = _normalize_all(path)
    assert len(convs) == 300 and not errors
    first = convs[0]
    assert [m["role"] for m in first.messages] == ["user", "assistant", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert first.messages[3] == {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}}]}
    assert first.messages[4]["content"].startswith('{"recipes": [{"name": "Chicken and Bell Pepper Stir Fry"')
    assert first.tools[0]["type"] == "function" and first.tools[0]["function"]["name"] == "search_recipes"
    assert sum(len(m.get("tool_calls", [])) for c in convs for m in c.messages) == 211
    assert sum(m["role"] == "tool" for c in convs for m in c.messages) == 211
    assert sum(c.tools is None for c in convs) == 109  # records with tools "" / "[]"


def test_fixture_llamafactory_reasoning_tool_use():
    path = fixture_path("datasets", "llamafactory_reason_tool_use_demo_50.jsonl")
    assert count_records(str(path)) == 50
    convs, errors = _normalize_all(path)
    assert len(convs) == 50 and not errors
    assistants = [m for c in convs for m in c.messages if m["role"] == "assistant"]
    assert len(assistants) == 112
    assert all(m["reasoning_content"] for m in assistants)
    assert sum(len(m.get("tool_calls", [])) for m in assistants) == 68
    assert sum("tool_calls" in m for m in assistants) == 53 and sum(m["content"] != "" for m in assistants) == 59
    first = convs[0].messages
    assert first[0]["role"] == "system" and first[0]["content"].startswith("You are a methodical and expert assistant.")
    assert first[2]["reasoning_content"].startswith("Okay, the user is asking for schools near latitude 40")
    assert first[2]["content"].startswith("I'm sorry, but the available tools")
    assert [t["function"]["name"] for t in convs[0].tools] == ["get_device_asset_by_identifier", "getwebsite", "user_by_id"]
    parallel = convs[2].messages[2]["tool_calls"]
    assert [c["function"]["arguments"] for c in parallel] == [{"radius": 1.5}, {"radius": 3}]


def test_fixture_axolotl_single_object_and_missing_turns():
    good = fixture_path("datasets", "axolotl_conversation.json")
    convs, errors = _normalize_all(good)
    assert len(convs) == 1 and not errors
    assert [m["role"] for m in convs[0].messages] == ["user", "assistant"] * 6
    assert convs[0].messages[0]["content"].startswith("how could i implement a minesweeper algorithm")
    bad = fixture_path("datasets", "axolotl_conversation.missingturns.json")
    convs, errors = _normalize_all(bad)
    assert convs == []
    assert list(errors) == [("empty_content", "message 1 (gpt): neither content nor tool_calls", f"{bad}:#0")]


def test_fixture_openai_cookbook():
    path = fixture_path("datasets", "openai_cookbook_toy_chat_fine_tuning.jsonl")
    records = list(iter_records([str(path)]))
    assert [r.location for r in records] == [f"{path}:{i}" for i in range(1, 6)]
    convs = [normalize_record(r.payload) for r in records]
    assert [[m["role"] for m in c.messages] for c in convs] == [
        ["system", "user", "assistant"],
        ["system"] + ["user", "assistant"] * 4,
        ["user", "assistant"],
        ["system", "assistant"],  # no user turn: accepted (see formats.py)
        ["system", "user", "assistant"],
    ]
    assert len(convs[4].messages[2]["content"]) == 26000
    assert all(c.tools is None for c in convs)


def test_fixture_sweagent_trajectory_with_history_key():
    path = fixture_path("datasets", "sweagent_marshmallow-code__marshmallow-1867.function_calling_replace_from_source.traj.json")
    (record,) = iter_records([str(path)])
    assert _reason(record.payload).reason == "unrecognized_format"
    keys = FormatKeys(messages="history")
    conv = normalize_record(record.payload, keys)
    roles = [m["role"] for m in conv.messages]
    assert len(roles) == 28 and roles[:2] == ["system", "user"] and roles.count("assistant") == 13 and roles.count("tool") == 13
    call = conv.messages[2]
    assert call == {"role": "assistant", "content": call["content"], "tool_calls": [
        {"type": "function", "function": {"name": "bash", "arguments": {"command": "ls -F"}}, "id": "call_9diWc1DYm4RLmPfHgIaP2wd"}]}
    assert call["content"].startswith("Let's list out some of the files in the repository")
    assert conv.messages[3]["tool_call_id"] == "call_9diWc1DYm4RLmPfHgIaP2wd"
    assert conv.messages[3]["content"].startswith("AUTHORS.rst\t    LICENSE\t RELEASING.md\t      performance/    src/\r\n")
    assert all(set(m) <= {"role", "content", "tool_calls", "tool_call_id"} for m in conv.messages)
