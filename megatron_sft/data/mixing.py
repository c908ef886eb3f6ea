"""Record-level transforms between reading and rendering: mixture sampling and pseudo multi-turn.

Both work on the record stream in input order and are reproducible from a seed.

Mixture sampling decides, from the per-source record counts alone (``count_records``), how many
times each record is used: ratio ``r`` = ``floor(r)`` full passes plus a seeded subset of
``round(frac(r) * rows)`` distinct rows. Worked example: 10 rows at ratio 2.5 -> every row
twice plus 5 seeded rows once more = 25 rows out; ratio 0.5 -> 5 seeded rows; ratio 0 -> none.
Each source draws from its own generator seeded by ``(seed, source_index)``, so adding or
resizing one source never changes another source's sample. Repeats are emitted next to each
other in stream order; shuffling is the packer's/loader's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

import numpy as np

from megatron_sft.data.formats import Conversation
from megatron_sft.errors import InputError


@dataclass(frozen=True)
class SourceSample:
    """One source's line in the report."""

    source_index: int
    num_rows_in: int
    num_rows_out: int
    ratio: float

    def to_report(self) -> dict:
        return {
            "source_index": self.source_index,
            "rows_in": self.num_rows_in,
            "rows_out": self.num_rows_out,
            "ratio": self.ratio,
        }


@dataclass
class MixturePlan:
    """How often each record of each source is used.

    ``take[s]`` holds source ``s``'s local row indices (0-based within that source), sorted, a row
    repeated once per use. ``offsets[s]`` is the global ``record_index`` of source ``s``'s row 0
    (sources are concatenated in order, as ``iter_records`` numbers them).
    """

    take: list[np.ndarray]
    offsets: list[int]
    summary: list[SourceSample]

    def repeats(self, source_index: int) -> np.ndarray:
        """Uses per local row of ``source_index`` (int64, one entry per input row)."""
        num_rows = self.summary[source_index].num_rows_in
        return np.bincount(self.take[source_index], minlength=num_rows)

    def apply(self, records: Iterable) -> Iterator:
        """Stream ``records`` (anything with ``source_index`` and ``record_index``, in input
        order) and yield each one as many times as the plan uses it; memory is O(rows of the
        largest source) for the repeat counts, not O(records)."""
        current, counts = None, None
        for record in records:
            if record.source_index != current:
                current = record.source_index
                counts = self.repeats(current)
            local = record.record_index - self.offsets[current]
            if not 0 <= local < counts.size:
                raise InputError(
                    f"record {record.record_index} is outside source {current}'s {counts.size} counted rows; "
                    "the plan was made from different inputs"
                )
            for _ in range(int(counts[local])):
                yield record

    def to_report(self) -> list[dict]:
        return [s.to_report() for s in self.summary]


def sample_mixture(counts: list[int], ratios: list[float], seed: int) -> MixturePlan:
    """Plan the mixture of ``len(counts)`` sources; ``ratios[s]`` >= 0 scales source ``s``
    (1.0 keeps it as is). Deterministic for ``(counts, ratios, seed)``."""
    if len(counts) != len(ratios):
        raise InputError(f"got {len(counts)} sources but {len(ratios)} mixture ratios; give one ratio per --input")
    problems = [f"source {s}: count {c}" for s, c in enumerate(counts) if int(c) != c or c < 0]
    problems += [f"source {s}: ratio {r}" for s, r in enumerate(ratios) if not math.isfinite(r) or r < 0]
    if problems:
        raise InputError("mixture needs counts >= 0 and finite ratios >= 0; " + "; ".join(problems))
    take, offsets, summary = [], [], []
    offset = 0
    for s, (count, ratio) in enumerate(zip(counts, ratios)):
        count = int(count)
        take.append(_sample_rows(count, float(ratio), np.random.default_rng([seed, s])))
        offsets.append(offset)
        summary.append(SourceSample(s, count, int(take[-1].size), float(ratio)))
        offset += count
    return MixturePlan(take=take, offsets=offsets, summary=summary)


def _sample_rows(count: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    whole = math.floor(ratio)
    num_extra = math.floor((ratio - whole) * count + 0.5)  # round half up, not to even
    extra = rng.choice(count, size=num_extra, replace=False) if num_extra else np.empty(0, np.int64)
    rows = np.concatenate([np.tile(np.arange(count, dtype=np.int64), whole), extra.astype(np.int64)])
    rows.sort(kind="stable")
    return rows


class _Provenanced(Protocol):
    source_index: int
    record_index: int


@dataclass
class MergedConversation:
    """A conversation and the records it came from (one, or several merged by pseudo multi-turn)."""

    source_index: int
    record_indices: list[int]
    conversation: Conversation
    locations: list[str] = field(default_factory=list)
    """``location`` of each merged record, when the input records carry one (``RawRecord`` does)."""


class PseudoMultiTurn:
    """Concatenate consecutive single-turn conversations into multi-turn ones.

    A single-turn conversation is ``[system?, user, assistant]`` with no tool calls. Walking the
    stream, each single-turn conversation joins the group before it with ``probability``, as
    long as the group has fewer than ``max_turns`` conversations and the two are compatible:
    same source, same tools, not a record already in the group (mixture repeats sit next to each
    other), and the newcomer's system message absent or equal to the group's (the merged
    conversation carries the first record's system message). Anything else closes
    the group and passes through unchanged. One random draw per single-turn conversation, in
    stream order, so the output depends only on the stream and ``seed``.

    Call it on an iterable of ``(record, conversation)`` pairs (``record`` has ``source_index``
    and ``record_index``); it yields ``MergedConversation``s. ``stats`` counts what it did.
    """

    def __init__(self, probability: float, max_turns: int, seed: int):
        if not 0.0 <= probability <= 1.0:
            raise InputError(f"pseudo multi-turn probability must be in [0, 1], got {probability}")
        if max_turns < 1:
            raise InputError(f"pseudo multi-turn max_turns must be >= 1, got {max_turns}")
        self.probability = probability
        self.max_turns = max_turns
        self.seed = seed
        self.stats = {"conversations_in": 0, "conversations_out": 0, "merged_conversations": 0}

    def __call__(self, pairs: Iterable[tuple[_Provenanced, Conversation]]) -> Iterator[MergedConversation]:
        rng = np.random.default_rng(self.seed)
        group: list[tuple[_Provenanced, Conversation]] = []
        for record, conversation in pairs:
            self.stats["conversations_in"] += 1
            if not _is_single_turn(conversation):
                yield from self._flush(group)
                group = []
                yield self._emit([(record, conversation)])
                continue
            joins = rng.random() < self.probability
            if group and joins and len(group) < self.max_turns and _compatible(group, (record, conversation)):
                group.append((record, conversation))
                continue
            yield from self._flush(group)
            group = [(record, conversation)]
        yield from self._flush(group)

    def _flush(self, group) -> Iterator[MergedConversation]:
        if group:
            yield self._emit(group)

    def _emit(self, group) -> MergedConversation:
        self.stats["conversations_out"] += 1
        first_record, first = group[0]
        indices = [r.record_index for r, _ in group]
        locations = [r.location for r, _ in group if getattr(r, "location", None) is not None]
        if len(group) == 1:
            return MergedConversation(first_record.source_index, indices, first, locations)
        self.stats["merged_conversations"] += 1
        messages = [dict(m) for m in first.messages]
        for _, conversation in group[1:]:
            messages += [dict(m) for m in conversation.messages if m["role"] != "system"]
        merged = Conversation(messages=messages, tools=first.tools)
        return MergedConversation(first_record.source_index, indices, merged, locations)


def _is_single_turn(conversation: Conversation) -> bool:
    roles = [m["role"] for m in conversation.messages]
    if roles and roles[0] == "system":
        roles = roles[1:]
    return roles == ["user", "assistant"] and not conversation.messages[-1].get("tool_calls")


def _system(conversation: Conversation) -> str | None:
    first = conversation.messages[0]
    return first["content"] if first["role"] == "system" else None


def _compatible(group: list[tuple], new: tuple) -> bool:
    (head_record, head_conv), (new_record, new_conv) = group[0], new
    new_system = _system(new_conv)
    return (
        all(r.record_index != new_record.record_index for r, _ in group)  # a mixture repeat
        and head_record.source_index == new_record.source_index
        and head_conv.tools == new_conv.tools
        and (new_system is None or new_system == _system(head_conv))
    )
