"""Mixture sampling and pseudo multi-turn: counts, determinism, provenance."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from megatron_sft.data.formats import Conversation, iter_records, normalize_record
from megatron_sft.data.mixing import MergedConversation, PseudoMultiTurn, sample_mixture


@dataclass
class Rec:
    source_index: int
    record_index: int


# ---------------------------------------------------------------- mixture


def test_mixture_counts_and_summary():
    plan = sample_mixture([10, 7, 4, 5], [2.5, 0.5, 0.0, 1.0], seed=3)
    assert [s.num_rows_out for s in plan.summary] == [25, 4, 0, 5]  # 0.5 * 7 = 3.5 rounds up
    assert plan.offsets == [0, 10, 17, 21]
    assert plan.to_report() == [
        {"source_index": 0, "rows_in": 10, "rows_out": 25, "ratio": 2.5},
        {"source_index": 1, "rows_in": 7, "rows_out": 4, "ratio": 0.5},
        {"source_index": 2, "rows_in": 4, "rows_out": 0, "ratio": 0.0},
        {"source_index": 3, "rows_in": 5, "rows_out": 5, "ratio": 1.0},
    ]
    repeats = plan.repeats(0)
    assert repeats.shape == (10,) and sorted(repeats.tolist()) == [2] * 5 + [3] * 5
    half = plan.repeats(1)
    assert half.sum() == 4 and set(half.tolist()) <= {0, 1}
    assert plan.repeats(3).tolist() == [1] * 5
    assert plan.take[2].size == 0
    for take in plan.take:
        assert take.dtype == np.int64 and np.all(np.diff(take) >= 0)


def test_mixture_is_deterministic_and_per_source():
    a = sample_mixture([100, 50], [0.3, 1.7], seed=7)
    b = sample_mixture([100, 50], [0.3, 1.7], seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a.take, b.take))
    other_seed = sample_mixture([100, 50], [0.3, 1.7], seed=8)
    assert not np.array_equal(a.take[0], other_seed.take[0])
    # A source's sample depends only on (seed, its index, its count, its ratio).
    resized = sample_mixture([100, 999, 3], [0.3, 0.1, 2.0], seed=7)
    assert np.array_equal(a.take[0], resized.take[0])
    assert len(np.unique(a.take[0])) == 30


def test_mixture_apply_streams_records(tmp_path):
    paths = []
    for name, n in (("a", 4), ("b", 3)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"i": f"{name}{i}"}) + "\n" for i in range(n)))
        paths.append(str(path))
    plan = sample_mixture([4, 3], [1.5, 0.34], seed=0)
    out = list(plan.apply(iter_records(paths)))
    assert len(out) == sum(s.num_rows_out for s in plan.summary) == 6 + 1
    expected = [i for s in range(2) for i in (plan.take[s] + plan.offsets[s]).tolist()]
    assert [r.record_index for r in out] == expected
    assert [r.source_index for r in out] == [0] * 6 + [1]


def test_mixture_apply_rejects_a_foreign_stream():
    plan = sample_mixture([2], [1.0], seed=0)
    with pytest.raises(ValueError, match="outside source 0's 2 counted rows"):
        list(plan.apply([Rec(0, 0), Rec(0, 5)]))


@pytest.mark.parametrize(
    "counts, ratios, message",
    [
        ([1, 2], [1.0], "got 2 sources but 1 mixture ratios"),
        ([1], [-0.5], "source 0: ratio -0.5"),
        ([1], [float("inf")], "source 0: ratio inf"),
        ([-1], [1.0], "source 0: count -1"),
    ],
)
def test_mixture_validation(counts, ratios, message):
    with pytest.raises(ValueError, match=message):
        sample_mixture(counts, ratios, seed=0)


# ---------------------------------------------------------------- pseudo multi-turn


def _single(i, system=None, tools=None):
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    return Conversation(messages=messages, tools=tools)


def _stream(n, source_index=0, **kw):
    return [(Rec(source_index, i), _single(i, **kw)) for i in range(n)]


def test_pseudo_multi_turn_always_merges_up_to_max_turns():
    merger = PseudoMultiTurn(probability=1.0, max_turns=3, seed=0)
    out = list(merger(_stream(7, system="S")))
    assert [m.record_indices for m in out] == [[0, 1, 2], [3, 4, 5], [6]]
    assert out[0].conversation.messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"},
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
    ]
    assert out[2].conversation.messages == _single(6, system="S").messages
    assert merger.stats == {"conversations_in": 7, "conversations_out": 3, "merged_conversations": 2}


def test_pseudo_multi_turn_never_merges_at_zero_probability_or_one_turn():
    for merger in (PseudoMultiTurn(0.0, 5, seed=1), PseudoMultiTurn(1.0, 1, seed=1)):
        out = list(merger(_stream(4)))
        assert [m.record_indices for m in out] == [[0], [1], [2], [3]]
        assert all(isinstance(m, MergedConversation) and m.source_index == 0 for m in out)
        assert all(m.locations == [] for m in out)  # these records carry no location


def test_pseudo_multi_turn_is_reproducible_and_covers_every_record():
    pairs = _stream(200)
    runs = [[m.record_indices for m in PseudoMultiTurn(0.5, 4, seed=11)(pairs)] for _ in range(2)]
    assert runs[0] == runs[1]
    other = [m.record_indices for m in PseudoMultiTurn(0.5, 4, seed=12)(pairs)]
    assert other != runs[0]
    flat = [i for group in runs[0] for i in group]
    assert flat == list(range(200))  # order and provenance preserved, nothing lost or repeated
    sizes = [len(g) for g in runs[0]]
    assert max(sizes) == 4 and min(sizes) == 1 and 1 < np.mean(sizes) < 4
    for group in PseudoMultiTurn(0.5, 4, seed=11)(pairs):
        contents = [m["content"] for m in group.conversation.messages]
        assert contents == [x for i in group.record_indices for x in (f"q{i}", f"a{i}")]


def test_pseudo_multi_turn_compatibility_rules():
    multi = Conversation(messages=_single(9).messages + _single(10).messages, tools=None)
    tool_call = Conversation(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                             "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}], tools=None)
    tools = [{"type": "function", "function": {"name": "f"}}]
    pairs = [
        (Rec(0, 0), _single(0, system="S")),
        (Rec(0, 1), _single(1)),                 # no system: joins under S
        (Rec(0, 2), _single(2, system="T")),     # different system: new group
        (Rec(0, 3), _single(3, system="T")),
        (Rec(0, 4), multi),                      # not single-turn: passes through, closes the group
        (Rec(0, 5), _single(5)),
        (Rec(1, 6), _single(6)),                 # other source: new group
        (Rec(1, 7), _single(7, tools=tools)),    # other tools: new group
        (Rec(1, 8), tool_call),                  # assistant tool call: not single-turn
        (Rec(1, 9), _single(9)),
    ]
    out = list(PseudoMultiTurn(1.0, 10, seed=0)(pairs))
    assert [(m.source_index, m.record_indices) for m in out] == [
        (0, [0, 1]), (0, [2, 3]), (0, [4]), (0, [5]), (1, [6]), (1, [7]), (1, [8]), (1, [9]),
    ]
    assert out[0].conversation.messages[0] == {"role": "system", "content": "S"}
    assert [m["role"] for m in out[1].conversation.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert out[2].conversation is multi and out[6].conversation is tool_call


def test_pseudo_multi_turn_does_not_mutate_inputs():
    pairs = _stream(3)
    before = [[dict(m) for m in c.messages] for _, c in pairs]
    merged = list(PseudoMultiTurn(1.0, 3, seed=0)(pairs))
    merged[0].conversation.messages[0]["content"] = "changed"
    assert [[dict(m) for m in c.messages] for _, c in pairs] == before


def test_pseudo_multi_turn_validation():
    with pytest.raises(ValueError, match=r"probability must be in \[0, 1\], got 1.5"):
        PseudoMultiTurn(1.5, 2, seed=0)
    with pytest.raises(ValueError, match="max_turns must be >= 1, got 0"):
        PseudoMultiTurn(0.5, 0, seed=0)


def test_pseudo_multi_turn_never_merges_a_record_with_its_repeat():
    pairs = [(Rec(0, 0), _single(0)), (Rec(0, 0), _single(0)), (Rec(0, 1), _single(1)), (Rec(0, 1), _single(1))]
    out = list(PseudoMultiTurn(1.0, 4, seed=0)(pairs))
    assert [m.record_indices for m in out] == [[0], [0, 1], [1]]


def test_pseudo_multi_turn_on_real_records(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = ((r, normalize_record(r.payload)) for r in iter_records([str(path)]))
    out = list(PseudoMultiTurn(1.0, 2, seed=0)(pairs))
    assert [m.record_indices for m in out] == [[0, 1], [2, 3], [4]]
    assert out[1].locations == [f"{path}:3", f"{path}:4"]
