"""Character spans of a rendered chat and the tokens that touch them (helpers of
:mod:`megatron_sft.data.chat_masks`; pure functions over strings and numpy arrays).

Marking: every string a message supplies to the template (``content``, ``reasoning_content``,
tool-call names, string tool-call argument values) is wrapped in a pair of private-use
characters unique to that string, *inside* its leading/trailing whitespace, so a template that
trims (``| trim``, ``.strip('\\n')``, ``lstrip``) sees exactly the whitespace it would see
unmarked::

    "  Paris.\\n"  ->  "  " + chr(0xF0000 + k) + "Paris." + chr(0x100000 + k) + "\\n"

Open markers live in Supplementary Private Use Area-A (U+F0000 + k), close markers in Area-B
(U+100000 + k). A marked render is usable only if removing every marker gives back the real
render character for character and the markers pair up (open k, close k, no nesting); then each
marked string's character interval in the real render is known exactly. A template that reacts
to the markers fails that check, and one that rewrites a string fails
:func:`rewritten_field`; the caller then falls back or reports an error instead of guessing.

Also here: :func:`span_violation` (the checks every mask passes), :func:`end_marker` (the
end-of-turn marker from two probe renders) and :class:`TokenIndex` (characters -> tokens by the
straddling rule described in :mod:`megatron_sft.data.chat_masks`).
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass

import numpy as np

_OPEN_BASE = 0xF0000
_CLOSE_BASE = 0x100000
MAX_FIELDS = 0xFFFD  # code points available in each private-use plane
MARKER_RE = re.compile("[\U000F0000-\U0010FFFF]")


@dataclass(frozen=True)
class Field:
    """One marked string: which message supplied it and what it is."""

    message_index: int
    kind: str  # "content" | "reasoning" | "tool_name" | "tool_argument"
    text: str  # the supplied string without its leading/trailing whitespace (what is marked)


@dataclass(frozen=True)
class Span:
    """A supervised (or, in mode "all", reported) character interval ``[start, end)``."""

    start: int
    end: int
    message_index: int
    role: str


@dataclass
class Located:
    """Result of parsing a marked render. ``occurrences[k]`` lists the ``[start, end)`` character
    intervals of field ``k`` in ``text`` (the render with markers removed)."""

    text: str
    occurrences: list[list[tuple[int, int]]]


class _Marker:
    """Builds marked copies of messages and remembers which field each marker pair stands for."""

    def __init__(self) -> None:
        self.fields: list[Field] = []

    def mark(self, text: str, message_index: int, kind: str) -> str:
        core = text.strip()
        if not core:
            return text
        if len(self.fields) >= MAX_FIELDS:
            raise OverflowError(f"more than {MAX_FIELDS} strings in one conversation; split it")
        k = len(self.fields)
        self.fields.append(Field(message_index, kind, core))
        lead = text[: len(text) - len(text.lstrip())]
        trail = text[len(text.rstrip()) :]
        return f"{lead}{chr(_OPEN_BASE + k)}{core}{chr(_CLOSE_BASE + k)}{trail}"

    def mark_value(self, value, message_index: int):
        """Marks the string leaves of a tool-call ``arguments`` value (dict, list or str)."""
        if isinstance(value, str):
            return self.mark(value, message_index, "tool_argument")
        if isinstance(value, dict):
            return {key: self.mark_value(v, message_index) for key, v in value.items()}
        if isinstance(value, list):
            return [self.mark_value(v, message_index) for v in value]
        return value


def mark_messages(messages: list[dict], only: set[int] | None = None) -> tuple[list[dict], list[Field]]:
    """Copies ``messages`` with their strings marked (all messages, or those in ``only``).

    Returns the marked copies and the field table; field ``k`` is marked by
    ``chr(0xF0000 + k)`` ... ``chr(0x100000 + k)``. Fields are numbered in message order, so the
    marked copies of ``messages[:i]`` carry exactly the fields of the first ``i`` messages.
    """
    marker = _Marker()
    marked = []
    for i, message in enumerate(messages):
        if only is not None and i not in only:
            marked.append(message)
            continue
        out = dict(message)
        if isinstance(out.get("content"), str):
            out["content"] = marker.mark(out["content"], i, "content")
        if isinstance(out.get("reasoning_content"), str):
            out["reasoning_content"] = marker.mark(out["reasoning_content"], i, "reasoning")
        if out.get("tool_calls"):
            calls = []
            for call in out["tool_calls"]:
                call = dict(call)
                function = dict(call.get("function") or {})
                if isinstance(function.get("name"), str):
                    function["name"] = marker.mark(function["name"], i, "tool_name")
                if "arguments" in function:
                    function["arguments"] = marker.mark_value(function["arguments"], i)
                call["function"] = function
                calls.append(call)
            out["tool_calls"] = calls
        marked.append(out)
    return marked, marker.fields


def locate(marked_render: str, num_fields: int) -> Located | None:
    """Parses a marked render; ``None`` if the markers do not pair up as ``open k ... close k``."""
    occurrences: list[list[tuple[int, int]]] = [[] for _ in range(num_fields)]
    removed = 0
    open_field, open_pos = -1, 0
    for match in MARKER_RE.finditer(marked_render):
        code = ord(match.group())
        pos = match.start() - removed
        removed += 1
        if code >= _CLOSE_BASE:
            k = code - _CLOSE_BASE
            if k != open_field:
                return None
            occurrences[k].append((open_pos, pos))
            open_field = -1
        else:
            k = code - _OPEN_BASE
            if open_field != -1 or k >= num_fields:
                return None
            open_field, open_pos = k, pos
    if open_field != -1:
        return None
    text = MARKER_RE.sub("", marked_render) if removed else marked_render
    return Located(text, occurrences)


def common_prefix_length(a: str, b: str, b_start: int = 0) -> int:
    """Length of the longest common prefix of ``a`` and ``b[b_start:]``."""
    if b.startswith(a, b_start):
        return len(a)
    lo, hi = 0, min(len(a), len(b) - b_start)
    while lo < hi:  # binary search on prefix equality: O(len * log len) in C-level compares
        mid = (lo + hi + 1) // 2
        if b.startswith(a[:mid], b_start):
            lo = mid
        else:
            hi = mid - 1
    return lo


def end_marker(final_tail: str, continued_tail: str) -> str:
    """The end-of-turn marker from what a template writes after an assistant turn's last string
    when the conversation ends there (``final_tail``) and when a user turn follows
    (``continued_tail``).

    The marker is their common part without trailing whitespace: ChatML
    ``"<|im_end|>\\n"`` / ``"<|im_end|>\\n<|im_start|>user\\n"`` -> ``"<|im_end|>"``. When the
    final tail is not a prefix of the continued one (Phi-3 appends ``<|endoftext|>`` only at the
    very end: ``"<|end|>\\n<|endoftext|>"`` vs ``"<|end|>\\n<|user|>\\n"``, common ``"<|end|>\\n<|"``)
    the common part is cut back to its last whitespace first (-> ``"<|end|>"``); with no
    whitespace to cut at, the marker is unknown and ``""`` is returned.
    """
    n = common_prefix_length(final_tail, continued_tail)
    if n == len(final_tail):
        return final_tail.rstrip()
    common = final_tail[:n]
    cut = max(common.rfind(ch) for ch in " \t\r\n")
    return common[:cut].rstrip() if cut > 0 else ""


def rewritten_field(loc: Located, fields: list[Field], roles: list[str]) -> str | None:
    """Each located string must be rendered verbatim, or JSON-string-escaped as ``tojson``
    renders tool arguments (and, in Llama 3, tool results). Returns what is wrong, or None."""
    for k, occurrences in enumerate(loc.occurrences):
        core = fields[k].text
        for a, b in occurrences:
            rendered = loc.text[a:b]
            if rendered != core and rendered != json.dumps(core, ensure_ascii=False)[1:-1]:
                m = fields[k].message_index
                return (f"message {m} ({roles[m]}): the template rewrites its {fields[k].kind} "
                        f"(rendered {rendered[:40]!r}, supplied {core[:40]!r})")
    return None


def span_violation(spans: list[Span], loc: Located, fields: list[Field], roles: list[str]) -> str | None:
    """Checks that spans are non-empty and disjoint, that each holds every located string of its
    own message (all of them, for an assistant turn) and none of another message's. Returns what
    is wrong, or None."""
    ordered = sorted(spans, key=lambda s: (s.start, s.end))
    for s in ordered:
        if s.start >= s.end:
            return f"message {s.message_index}: empty span"
    for s, t in zip(ordered, ordered[1:]):
        if t.start < s.end:
            return f"spans of messages {s.message_index} and {t.message_index} overlap"
    occ = sorted((a, b, fields[k].message_index, fields[k].kind) for k, o in enumerate(loc.occurrences) for a, b in o)
    occ_ends = [b for _, b, _, _ in occ]  # occurrences never overlap: sorted by end as well
    for s in ordered:
        j = bisect.bisect_right(occ_ends, s.start)
        while j < len(occ) and occ[j][0] < s.end:
            a, b, m, kind = occ[j]
            if m != s.message_index:
                return f"the {kind} of message {m} ({roles[m]}) lies inside the span of message {s.message_index}"
            if a < s.start or b > s.end:
                return f"the {kind} of message {m} crosses the edge of its span"
            j += 1
    own: dict[int, list[tuple[int, int, str]]] = {}
    for a, b, m, kind in occ:
        own.setdefault(m, []).append((a, b, kind))
    for s in ordered:
        if s.role == "assistant":
            for a, b, kind in own.get(s.message_index, []):
                if a < s.start or b > s.end:
                    return f"assistant message {s.message_index}: its {kind} lies outside its span"
    return None


class TokenIndex:
    """``cover(intervals)`` marks the tokens with at least one character in any ``[a, b)`` (the
    straddling rule): offsets ``[s, e)`` with ``s < e``, ``s < b`` and ``e > a``. Offsets of a
    fast tokenizer are non-decreasing, so each interval is a slice found by binary search (all
    intervals at once); otherwise a comparison per interval."""

    def __init__(self, offsets: np.ndarray):
        self.starts, self.ends = offsets[:, 0], offsets[:, 1]
        self.width = self.ends > self.starts
        self.monotone = bool(np.all(offsets[1:] >= offsets[:-1]))  # starts and ends both non-decreasing

    def cover(self, intervals: list[tuple[int, int]]) -> np.ndarray:
        n = len(self.starts)
        if not intervals:
            return np.zeros(n, dtype=bool)
        a, b = np.asarray(intervals, dtype=np.int64).T
        if not self.monotone:
            hit = np.zeros(n, dtype=bool)
            for lo, hi in zip(a.tolist(), b.tolist()):
                hit |= (self.starts < hi) & (self.ends > lo)
            return hit & self.width
        lo = np.searchsorted(self.ends, a, side="right").tolist()  # first token ending after a
        hi = np.searchsorted(self.starts, b, side="left").tolist()  # first token starting at/after b
        hit = np.zeros(n, dtype=bool)
        for first, stop in zip(lo, hi):
            hit[first:stop] = True
        return hit & self.width
