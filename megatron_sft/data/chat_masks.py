"""Template-agnostic loss masks for chat conversations: which tokens of a rendered conversation
are supervised targets.

Contract (see DESIGN.md, "Chat masks"): :meth:`ChatMasker.encode` renders the whole conversation
once with the tokenizer's own chat template, tokenizes it with offsets, and returns
``input_ids`` (int32, equal to ``apply_chat_template(..., tokenize=True)``) and ``loss_mask``
(uint8, same length; ``loss_mask[j] == 1`` iff ``input_ids[j]`` is a supervised target). No code
knows any particular model: every fact about a template is read off its own renders.

Supervised span of an assistant turn (character interval of the render): from right after the
generation prompt (``<|im_start|>assistant\\n``, ``<|start_header_id|>assistant<|end_header_id|>
\\n\\n``, Mistral's ``[/INST]``) to the end of the end-of-turn marker (``<|im_end|>``,
``<|eot_id|>``, ``<end_of_turn>``, ``</s>``, ``<|end|>``). It holds whatever the template puts
there (reasoning it keeps, rendered tool calls); never the role header, never whitespace after
the marker, never system/user/tool text. A non-assistant message trained with ``train=True``
contributes its content only.

How spans are found (a constant number of renders per conversation plus a few per template,
so the cost grows linearly with the number of turns):

1. One *marked* render (:mod:`megatron_sft.data.chat_spans`): every supplied string wrapped in
   private-use markers; removing them must give the real render exactly, and each marked
   interval must hold its string verbatim (or JSON-string-escaped, as ``tojson`` renders tool
   arguments). That gives the exact position of every content, reasoning, tool-call name and
   string argument. If the template reacts to the markers, each message is marked on its own
   instead (one render per message, same exactness); a template that rewrites text (uppercases
   it, splits it) gives ``span_not_found``.
2. Turn start: the text a generation-prompt render of ``messages[:i]`` writes after its last
   supplied string (e.g. ``<|im_end|>\n<|im_start|>assistant\n``) must follow the string that
   precedes turn ``i`` in the real render; the turn starts after it. This is the prefix-render
   rule applied locally, so it also holds for templates that are not prefix-stable (Qwen3 drops
   earlier ``<think>``, Mistral v0.3 moves the system prompt, Gemma merges it into a user turn).
   The text is cached per (previous role, previous has tool calls, tools given) and rendered
   exactly again whenever the cached text does not match the real render at that point. If the
   exact text matches only partly (Qwen3 with ``enable_thinking=False`` prompts an empty think
   block that history turns do not render), the turn starts after the last whitespace of the
   matching part (``assistant\n``); with no whitespace there it is ``span_not_found``.
3. Turn end: the end-of-turn marker, learned once per masker from a two-turn probe (what the
   template writes after an assistant reply when the chat ends there vs. when a user follows;
   see :func:`~megatron_sft.data.chat_spans.end_marker`), found after the turn's last string and
   before the next message's; otherwise what a render ending with this turn writes there.
4. Verification: every supplied string of a supervised turn lies inside its span, no string of
   another message lies inside any span, spans do not overlap. Any failure is a
   :class:`MaskError` with a reason; a mask is never guessed.

Characters -> tokens (the straddling rule): token ``j`` with offsets ``[s, e)`` is supervised iff
``s < e`` and ``[s, e)`` intersects a supervised span ``[a, b)``, i.e. ``s < b and e > a``: a
token is supervised iff any of its characters lies inside the span. Zero-width tokens (e.g. a
BOS added by the tokenizer, offsets ``(0, 0)``) are never supervised in the per-turn modes.
Worked example: render ``"...assistant\nHi!<|eot|>\n..."`` with ``"H"`` at character 20, so
the span ``"Hi!<|eot|>"`` is ``[20, 30)``, on a tokenizer without ``<|eot|>`` in its vocabulary::

    "assistant" [10, 19)  outside                       -> 0
    "\nH"       [19, 21)  straddles the start (20 in)   -> 1
    "i!"        [21, 23)  inside                        -> 1
    "<|eot"     [23, 28)  inside                        -> 1
    "|>\n"      [28, 31)  straddles the end (28, 29 in) -> 1  (the model must emit it to close
                                                              the marker; its "\n" comes along)
Had the tokenizer split ``"|>"`` ``[28, 30)`` and ``"\n"`` ``[30, 31)``, the ``"\n"`` would be
outside and unsupervised. Real case: Llama-3 templates on a Qwen tokenizer end turns in a
``"|><"`` token, supervised with the ``<|eot_id|>`` it completes.

Silent loss is counted, not hidden: ``EncodedConversation.reasoning_not_rendered`` is the number of
assistant turns whose supplied ``reasoning_content`` appears nowhere in the render (a template
without reasoning support, or Qwen3 dropping it before the last user turn).

Modes: ``assistant`` (every assistant turn), ``last_assistant`` (only the last assistant turn),
``all`` (every token; ``supervised_tokens_by_role`` then counts tokens per role by span and the
rest as ``"template"``). A message's ``train`` key overrides the mode: ``True`` supervises it,
``False`` removes it (in ``all`` mode its span is zeroed). An assistant turn with neither
content nor tool calls has nothing to supervise and is skipped.

Errors (:class:`MaskError`, ``reason``): ``no_chat_template``; ``template_error`` (the template
raised, e.g. Gemma's "System role not supported"; the detail carries its message);
``render_mismatch`` (tokenizing the render does not give the template's own ids);
``span_not_found`` (a string is rewritten, repeated or dropped by the template, or a turn's
start/end cannot be found; e.g. Llama 3 drops an assistant's text next to its tool call);
``span_verification_failed``; ``no_supervised_tokens``.
"""

from __future__ import annotations

import bisect
import itertools
import typing
from dataclasses import dataclass, field

import numpy as np

from megatron_sft.errors import InputError, SFTError
from megatron_sft.data.chat_spans import (
    MARKER_RE,
    Field,
    Located,
    Span,
    TokenIndex,
    common_prefix_length,
    end_marker,
    locate,
    mark_messages,
    rewritten_field,
    span_violation,
)

MaskMode = typing.Literal["assistant", "all", "last_assistant"]
MASK_MODES = typing.get_args(MaskMode)  # which turns are supervised (preprocessing --mode)
TEMPLATE_ROLE = "template"  # report key for tokens outside every message's span (mode "all")


class MaskError(SFTError, ValueError):
    """A conversation that cannot be given a verified loss mask.

    ``reason`` is a short snake_case code (a report key): ``no_chat_template``,
    ``template_error``, ``render_mismatch``, ``span_not_found``, ``span_verification_failed``,
    ``no_supervised_tokens``. ``detail`` says what was wrong and, where possible, the fix.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class EncodedConversation:
    input_ids: np.ndarray  # int32 [num_tokens], the template's own tokenization of the render
    loss_mask: np.ndarray  # uint8 [num_tokens]; 1 iff input_ids[j] is a supervised target
    supervised_tokens_by_role: dict[str, int]  # e.g. {"assistant": 57}
    reasoning_not_rendered: int = 0
    """Assistant turns whose ``reasoning_content`` the template leaves out of the render (Qwen2.5
    renders none, Qwen3 none before the last user turn): that reasoning is not trained on."""


_UNSET = object()


@dataclass
class _Conversation:
    """One conversation being encoded: its messages (without ``train``), the real render, where
    each supplied string lies in it, and how to mark prefixes for the renders that find turn
    edges."""

    clean: list[dict]
    tools: list | None
    fields: list[Field]
    loc: Located
    marked: list[dict] | None  # all messages marked at once; None when that changed the render
    by_message: dict[int, list[int]] = field(init=False)
    ordered: list[tuple[int, int, int]] = field(init=False)  # (start, end, message) of every string

    def __post_init__(self):
        self.by_message = {}
        for k, f in enumerate(self.fields):
            self.by_message.setdefault(f.message_index, []).append(k)
        self.ordered = sorted((s, e, self.fields[k].message_index)
                              for k, occ in enumerate(self.loc.occurrences) for s, e in occ)

    def unrendered(self, kind: str) -> list[int]:
        """Messages that supplied a ``kind`` string (e.g. "reasoning") the render does not hold."""
        return sorted({f.message_index for f, occ in zip(self.fields, self.loc.occurrences)
                       if f.kind == kind and not occ})

    def marked_prefix(self, stop: int, message: int) -> tuple[list[dict], list[Field]]:
        """``messages[:stop]`` marked for a prefix render: all strings when marking them all was
        verified not to change the render, otherwise only those of ``message`` (verified alone)."""
        if self.marked is not None:
            return self.marked[:stop], self.fields
        return mark_messages(self.clean[:stop], only={message})


class ChatMasker:
    """Encodes conversations (OpenAI-form messages) into ids + verified loss masks.

    Args:
        tokenizer: a ``transformers`` fast tokenizer (offsets are needed).
        chat_template: overrides ``tokenizer.chat_template``.
        mode: ``"assistant"``, ``"all"`` or ``"last_assistant"``; anything else is a ValueError.
        template_kwargs: extra variables for the template (``enable_thinking``, ``date_string``...).

    A missing chat template is reported by :meth:`encode` (``MaskError("no_chat_template")``)
    so a compiler can count it per record. Instances cache facts about their template (the
    special-token convention of its tokenization, generation-prompt texts, the end-of-turn
    marker); they are not thread-safe.
    """

    # The template's own tokenization (apply_chat_template(tokenize=True)) is compared with ours
    # on the first conversation and then on every N-th one; it is the same deterministic call
    # (render, then tokenize without added special tokens), so 1 in 64 keeps the cost near 1x.
    render_check_every: int = 64

    def __init__(self, tokenizer, chat_template: str | None = None, mode: str = "assistant",
                 template_kwargs: dict | None = None):
        if mode not in MASK_MODES:
            raise InputError(f"mode must be one of {MASK_MODES}, got {mode!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise InputError("ChatMasker needs a fast tokenizer (character offsets); load it with "
                             "AutoTokenizer.from_pretrained(..., use_fast=True)")
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        self.mode = mode
        self.template_kwargs = dict(template_kwargs or {})
        self._add_special_tokens: bool | None = None
        self._num_encoded = 0
        self._text_cache: dict[tuple, str] = {}  # turn-start and turn-end texts, see module doc
        self._marker = _UNSET

    # ------------------------------------------------------------------ public
    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> EncodedConversation:
        """Renders, tokenizes and masks one conversation; raises :class:`MaskError`."""
        if not self.chat_template:
            raise MaskError("no_chat_template", "the tokenizer has no chat_template and none was given; "
                            "pass chat_template= (e.g. the model's chat_template.jinja)")
        if not messages:
            raise MaskError("template_error", "empty conversation")
        clean = [{k: v for k, v in m.items() if k != "train"} for m in messages]
        text = self._render(clean, tools, add_generation_prompt=False)
        ids, offsets = self._tokenize(text, clean, tools)
        supervised = self._supervised_flags(messages)
        spans, conv = self._find_spans(clean, tools, text, supervised)
        problem = span_violation(spans, conv.loc, conv.fields, [m.get("role") for m in clean])
        if problem:
            raise MaskError("span_verification_failed", problem)
        train_false = {i for i, m in enumerate(messages) if m.get("train") is False}
        loss_mask, by_role = self._mask(ids, offsets, spans, supervised, train_false)
        if self.mode != "all" and not loss_mask.any():
            raise MaskError("no_supervised_tokens", "no assistant turn (or train=True message) with content "
                            "to supervise; drop the record or mark a message train=True")
        self._num_encoded += 1
        return EncodedConversation(ids, loss_mask, by_role, len(conv.unrendered("reasoning")))

    # --------------------------------------------------------------- rendering
    def _render(self, messages: list[dict], tools, add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt, **self.template_kwargs)
        except Exception as exc:  # the template's raise_exception, jinja errors, bad data
            raise MaskError("template_error", f"{type(exc).__name__}: {exc}") from exc

    def _tokenize(self, text: str, clean: list[dict], tools) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes the render with offsets; checks the ids against the template's own
        tokenization (first call and every ``render_check_every``-th)."""
        add_special = bool(self._add_special_tokens)
        enc = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True,
                             return_attention_mask=False)
        if self._add_special_tokens is None or self._num_encoded % self.render_check_every == 0:
            try:
                own = list(self.tokenizer.apply_chat_template(
                    clean, tools=tools, chat_template=self.chat_template, tokenize=True,
                    return_dict=False, **self.template_kwargs))
            except Exception as exc:
                raise MaskError("template_error", f"{type(exc).__name__}: {exc}") from exc
            if own != list(enc["input_ids"]) and self._add_special_tokens is None:
                alt = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True,
                                     return_attention_mask=False)
                if own == list(alt["input_ids"]):
                    enc, add_special = alt, True
            if own != list(enc["input_ids"]):
                raise MaskError("render_mismatch", "tokenizing the rendered text does not reproduce "
                                "apply_chat_template(tokenize=True); the template is not deterministic "
                                "(e.g. strftime_now: pass date_string in template_kwargs) or the tokenizer "
                                "is not the template's")
            self._add_special_tokens = add_special
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        pairs = enc["offset_mapping"]  # list of tuples; fromiter is ~2x quicker than np.array here
        offsets = np.fromiter(itertools.chain.from_iterable(pairs), dtype=np.int64, count=2 * len(pairs)).reshape(-1, 2)
        if len(ids) and offsets[:, 1].max() > len(text):
            raise MaskError("render_mismatch", "token offsets point past the end of the render")
        return ids, offsets

    # ------------------------------------------------------------------ spans
    def _supervised_flags(self, messages: list[dict]) -> list[bool]:
        assistants = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        last = assistants[-1] if assistants else -1
        flags = []
        for i, m in enumerate(messages):
            flag = m.get("role") == "assistant" and (self.mode != "last_assistant" or i == last)
            if "train" in m and m["train"] is not None:
                flag = bool(m["train"])
            flags.append(flag)
        return flags

    def _find_spans(self, clean, tools, text, supervised) -> tuple[list[Span], _Conversation]:
        conv = self._locate_fields(clean, tools, text)
        spans = []
        for i, message in enumerate(clean):
            if not (supervised[i] or self.mode == "all"):
                continue
            role = message.get("role")
            if role == "assistant":
                span = self._assistant_span(conv, i)
                if span is not None:
                    spans.append(span)
                continue
            intervals = [iv for k in conv.by_message.get(i, []) if conv.fields[k].kind == "content"
                         for iv in conv.loc.occurrences[k]]
            if supervised[i] and len(intervals) != 1:
                raise MaskError("span_not_found", f"message {i} ({role}) has train=True but its content "
                                f"appears {len(intervals)} times in the render")
            spans.extend(Span(s, e, i, role) for s, e in intervals)
        return spans, conv

    def _locate_fields(self, clean, tools, text) -> _Conversation:
        """Marked render -> intervals of every supplied string; per-message fallback."""
        if MARKER_RE.search(text):  # a supplied string that reaches the render holds a marker character
            raise MaskError("span_not_found", "the conversation contains characters U+F0000..U+10FFFF, "
                            "reserved for span markers; remove them in normalisation")
        try:
            marked, fields = mark_messages(clean)
        except OverflowError as exc:
            raise MaskError("span_not_found", str(exc)) from exc
        loc = locate(self._render(marked, tools, False), len(fields))
        if loc is None or loc.text != text:
            # The template reacts to the markers: mark one message at a time (O(turns) renders).
            marked, loc = None, Located(text, [[] for _ in fields])
            for i in sorted({f.message_index for f in fields}):
                one, one_fields = mark_messages(clean, only={i})
                one_loc = locate(self._render(one, tools, False), len(one_fields))
                if one_loc is None or one_loc.text != text:
                    raise MaskError("span_not_found", f"message {i} ({clean[i].get('role')}): the template "
                                    "rewrites its text (it cannot be found verbatim in the render), so no span "
                                    "can be verified; use a template that renders message text unchanged")
                ids = [k for k, f in enumerate(fields) if f.message_index == i]
                for local_k, k in enumerate(ids):
                    loc.occurrences[k] = one_loc.occurrences[local_k]
        problem = rewritten_field(loc, fields, [m.get("role") for m in clean])
        if problem:
            raise MaskError("span_not_found", f"{problem}, so no span can be verified; use a template that "
                            "renders message text unchanged")
        return _Conversation(clean, tools, fields, loc, marked)

    def _assistant_span(self, conv: _Conversation, i: int) -> Span | None:
        own_ids = conv.by_message.get(i, [])
        for k in own_ids:
            n = len(conv.loc.occurrences[k])
            if n > 1 or (n == 0 and conv.fields[k].kind == "content"):
                why = "the template does not render it (some drop content next to tool_calls)" if n == 0 else \
                    "the template repeats it"
                raise MaskError("span_not_found", f"assistant message {i}: its {conv.fields[k].kind} appears {n} "
                                f"times in the render (expected once): {why}")
        intervals = [iv for k in own_ids for iv in conv.loc.occurrences[k]]
        if not intervals:
            return None  # neither content nor rendered tool calls: nothing to supervise
        first = min(s for s, _ in intervals)
        last = max(e for _, e in intervals)
        # Nearest other-message strings before and after the turn. Occurrences never overlap
        # (markers cannot nest), so ``ordered`` is sorted by start and by end alike.
        ordered = conv.ordered
        j = bisect.bisect_right(ordered, (first, -1, -1)) - 1
        while j >= 0 and ordered[j][2] == i:
            j -= 1
        prev_end = ordered[j][1] if j >= 0 else 0
        j = bisect.bisect_left(ordered, (last, -1, -1))
        while j < len(ordered) and ordered[j][2] == i:
            j += 1
        next_start = ordered[j][0] if j < len(ordered) else len(conv.loc.text)
        start = self._turn_start(conv, i, first, prev_end)
        end = self._turn_end(conv, i, last, next_start)
        return Span(start, end, i, "assistant")

    def _turn_start(self, conv: _Conversation, i: int, first: int, prev_end: int) -> int:
        if i == 0:
            raise MaskError("span_not_found", "the conversation starts with an assistant message: there is "
                            "no generation prompt to find where it starts; add the user turn it answers")
        text, prev = conv.loc.text, conv.clean[i - 1]
        key = ("head", prev.get("role"), bool(prev.get("tool_calls")), prev_end == 0, conv.tools is None)
        head = self._text_cache.get(key)
        if head is None or not text.startswith(head, prev_end):
            head = self._text_cache[key] = self._exact_head(conv, i)
        n = common_prefix_length(head, text, prev_end)
        if n < len(head):
            # A partial match counts up to its last line break / space: e.g. Qwen3 with
            # enable_thinking=False prompts "assistant\n<think>\n\n</think>\n\n" but renders
            # history turns as "assistant\nAnswer" (common "assistant\n", cut there).
            n = max(head.rfind(ch, 0, n) for ch in " \t\r\n") + 1
            if n == 0:
                raise MaskError("span_not_found", f"assistant message {i}: the generation prompt {head!r} does "
                                "not follow the previous message in the render")
        if prev_end + n > first:
            raise MaskError("span_not_found", f"assistant message {i}: its generation prompt overlaps its text")
        return prev_end + n

    def _exact_head(self, conv: _Conversation, i: int) -> str:
        """What a generation-prompt render of messages[:i] writes after its last supplied string."""
        marked, fields = conv.marked_prefix(i, i - 1)
        prefix = locate(self._render(marked, conv.tools, True), len(fields))
        if prefix is None:
            raise MaskError("span_not_found", f"assistant message {i}: the generation-prompt render of the "
                            "messages before it could not be parsed")
        last = max((e for occ in prefix.occurrences for _, e in occ), default=0)
        return prefix.text[last:]

    def _turn_end(self, conv: _Conversation, i: int, last: int, next_start: int) -> int:
        text = conv.loc.text
        marker = self._end_marker()
        j = text.find(marker, last) if marker else -1
        if j >= 0 and j + len(marker) <= next_start:
            return j + len(marker)
        # No marker before the next message's text: what a render ending with this turn writes
        # after the turn's last string (cached like the turn start; verification rejects the span
        # if it swallows another message's text).
        key = ("tail", bool(conv.clean[i].get("tool_calls")), conv.tools is None)
        tail = self._text_cache.get(key)
        if tail is None or not text.startswith(tail, last):
            marked, fields = conv.marked_prefix(i + 1, i)
            ended = locate(self._render(marked, conv.tools, False), len(fields))
            own = [e for k, f in enumerate(fields) if f.message_index == i
                   for _, e in (ended.occurrences[k] if ended else [])]
            if not own:
                raise MaskError("span_not_found", f"assistant message {i}: cannot find its end-of-turn text")
            tail = self._text_cache[key] = ended.text[max(own):]
        return last + len(end_marker(tail, text[last:]))

    def _end_marker(self) -> str:
        """End-of-turn marker from a two-turn probe, cached; "" when it cannot be learned."""
        if self._marker is _UNSET:
            self._marker = ""
            base = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
            try:
                m2, f2 = mark_messages(base)
                m3, f3 = mark_messages(base + [{"role": "user", "content": "Bye"}])
                l2 = locate(self._render(m2, None, False), len(f2))
                l3 = locate(self._render(m3, None, False), len(f3))
                final = l2.text[l2.occurrences[1][0][1]:]
                continued = l3.text[l3.occurrences[1][0][1]: l3.occurrences[2][0][0]]
                self._marker = end_marker(final, continued)
            except (MaskError, AttributeError, IndexError):
                pass
        return self._marker

    # ------------------------------------------------------------------- mask
    def _mask(self, ids, offsets, spans, supervised, train_false):
        """Straddling rule over all spans at once. A token touching spans of two roles counts once,
        for the role that comes first in message order."""
        index = TokenIndex(offsets)
        if self.mode == "all":
            loss_mask = np.ones(len(ids), dtype=np.uint8)
            loss_mask[index.cover([(s.start, s.end) for s in spans if s.message_index in train_false])] = 0
            counted = spans
        else:
            counted = [s for s in spans if supervised[s.message_index]]
            loss_mask = index.cover([(s.start, s.end) for s in counted]).astype(np.uint8)
        on = loss_mask.astype(bool)
        covered = np.zeros(len(ids), dtype=bool)
        by_role: dict[str, int] = {}
        roles = list(dict.fromkeys(s.role for s in counted))
        if self.mode != "all" and len(roles) == 1:  # the usual case: assistant turns only
            return loss_mask, {roles[0]: int(np.count_nonzero(on))}
        for role in roles:
            touched = index.cover([(s.start, s.end) for s in counted if s.role == role])
            if count := int(np.count_nonzero(touched & ~covered & on)):
                by_role[role] = count
            covered |= touched
        if self.mode == "all" and (rest := int(np.count_nonzero(on & ~covered))):
            by_role[TEMPLATE_ROLE] = rest
        return loss_mask, by_role
