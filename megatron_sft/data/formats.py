"""Chat records in any supported input format -> one normalised ``Conversation``.

The public home of the input-format contract: the readers (``iter_records``, ``count_records``,
``RawRecord``, ``FormatKeys``, ``RecordError``) live in ``readers.py`` and are re-exported here.

Normalised message (OpenAI form; optional keys are absent, never None)::

    {"role": "system" | "user" | "assistant" | "tool",
     "content": str,                         # "" only for an assistant turn that has tool_calls
     "tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict},
                     "id": str (only when the input had one)}],      # assistant only
     "reasoning_content": str,               # assistant only
     "tool_call_id": str, "name": str,
     "train": bool}                          # per-message supervision override from train/weight

Inputs: OpenAI ``messages`` (role/content; tool_calls with arguments as dict or JSON string;
tool role; reasoning_content; ``tools`` per record, possibly a JSON string), ShareGPT
``conversations`` (from/value; roles via ``FormatKeys.role_map``), content given as a list of
parts (``{"type": "text", "text"|"value": ...}``, LLaMA-Factory's ``reasoning`` and
``tool_call`` parts), an optional record-level ``system`` string (LLaMA-Factory's ShareGPT
``system`` column). Each message is read by its own keys: one with ``role`` uses role/content,
one with ``from`` uses from/value, whichever list it sits in.

Decisions:
  * A ``function_call`` message (role map target ``tool_call``) that directly follows an
    assistant message merges into it: its calls are appended to that turn's ``tool_calls``. A
    text reply followed by a call is one assistant turn in OpenAI form; kept as two messages, a
    template would end the turn between them and teach the model to stop before calling.
    Consecutive function_calls therefore become one turn with parallel calls. Otherwise it
    becomes an assistant message with content "" and its calls; so does one carrying its own
    reasoning_content. Plain consecutive assistant messages are left as they are.
  * Tool schemas given bare (``{"name", "description", "parameters"}``, glaive) are wrapped as
    ``{"type": "function", "function": ...}``; an empty list or "" means no tools (None).
  * Contents are kept byte-exact (no stripping, "\\r\\n" stays); text parts are joined with "".
  * An assistant turn with only reasoning_content is ``empty_content`` (nothing to answer with).
  * A tool message's ``tool_call_ids`` list of exactly one id (SWE-agent) becomes
    ``tool_call_id``. Any other key (``thought``, ``agent``, ``action``...) is dropped.
  * ``weight`` 0/1 maps to train False/True; ``train`` must be a bool; both given must agree.
    The flag is kept on any role; whether a user turn may be trained is the mask builder's call.
  * Records without a user turn (the OpenAI cookbook's system + assistant) are accepted: they
    are well-formed conversations; a template that refuses them fails later with its own reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from megatron_sft.data.readers import (
    DEFAULT_ROLE_MAP,
    FormatKeys,
    RawRecord,
    RecordError,
    count_records,
    iter_records,
    parse_json_line,
)

__all__ = [
    "DEFAULT_ROLE_MAP", "Conversation", "FormatKeys", "RawRecord", "RecordError", "REASONS",
    "count_records", "iter_records", "normalize_record", "parse_json_line",
]

# Every reason this module and the readers can give, for reports and docs.
REASONS = (
    "invalid_json", "non_utf8", "not_an_object",  # readers
    "unrecognized_format", "bad_message", "unknown_role", "bad_content", "unsupported_content",
    "empty_content", "no_assistant_turn", "bad_tool_call", "bad_tools", "bad_train_flag", "bad_weight",
)

_SYSTEM_KEY = "system"  # LLaMA-Factory's ShareGPT record-level system prompt


@dataclass
class Conversation:
    """A normalised conversation (see the module docstring for the message form)."""

    messages: list[dict]
    tools: list[dict] | None


def normalize_record(payload: dict, keys: FormatKeys = FormatKeys()) -> Conversation:
    """Normalise one parsed record; raises ``RecordError`` (reason in ``REASONS``) with a detail
    naming the offending message index (its index in the input list)."""
    if not isinstance(payload, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(payload).__name__}")
    raw_messages = _find_messages(payload, keys)
    tools = _normalize_tools(payload.get(keys.tools))
    roles = keys.roles()
    messages: list[dict] = []
    origins: list[tuple[int, str]] = []  # (input index, source role) per message, for error details
    for i, raw in enumerate(raw_messages):
        message, is_call = _normalize_message(i, raw, keys, roles)
        joins = is_call and messages and messages[-1]["role"] == "assistant"
        if joins and "reasoning_content" not in message:  # a call with its own reasoning stays a turn
            _merge_tool_call(messages[-1], message, i)
        else:
            messages.append(message)
            origins.append((i, raw.get(keys.role) or raw.get(keys.from_)))
    for message, (i, source_role) in zip(messages, origins):
        if message["role"] == "assistant" and not message["content"] and not message.get("tool_calls"):
            raise RecordError("empty_content", f"message {i} ({source_role}): neither content nor tool_calls")
    _prepend_system(payload, messages)
    if not any(m["role"] == "assistant" for m in messages):
        found = ", ".join(m["role"] for m in messages) or "none"
        raise RecordError("no_assistant_turn", f"no assistant message among {len(messages)} (roles: {found})")
    return Conversation(messages=messages, tools=tools)


def _find_messages(payload: dict, keys: FormatKeys) -> list:
    for key in (keys.messages, keys.conversations):
        value = payload.get(key)
        if value is None:
            continue
        if isinstance(value, str):  # some Parquet exports store the list as JSON text
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise RecordError("unrecognized_format", f"{key!r} is a string but not JSON: {e.msg}") from None
        if not isinstance(value, list):
            found = type(value).__name__
            raise RecordError("unrecognized_format", f"{key!r} must be a list of messages, got {found}")
        return value
    present = ", ".join(sorted(map(str, payload))[:12]) or "none"
    raise RecordError(
        "unrecognized_format",
        f"no {keys.messages!r} or {keys.conversations!r} key (keys present: {present}); {_key_hint(payload, keys)}",
    )


def _key_hint(payload: dict, keys: FormatKeys) -> str:
    """The flag that fixes a record whose message list sits under another key: the first key
    holding a list of objects with a role (``--messages-key``) or from (``--conversations-key``)."""
    for key, value in payload.items():
        if isinstance(value, str) and value[:1] == "[":  # a list stored as JSON text
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                continue
        first = value[0] if isinstance(value, list) and value else None
        if isinstance(first, dict) and keys.role in first:
            return f"{key!r} holds {keys.role!r}-keyed messages: pass --messages-key {key}"
        if isinstance(first, dict) and keys.from_ in first:
            return f"{key!r} holds {keys.from_!r}-keyed messages: pass --conversations-key {key}"
    return ("pass --messages-key KEY (a list of role/content messages) or --conversations-key KEY "
            "(a list of from/value messages) naming the key that holds the conversation")


def _prepend_system(payload: dict, messages: list[dict]) -> None:
    system = payload.get(_SYSTEM_KEY)
    if system is None or system == "":
        return
    if not isinstance(system, str):
        found = type(system).__name__
        raise RecordError("bad_content", f"record-level {_SYSTEM_KEY!r} must be a string, got {found}")
    if messages and messages[0]["role"] == "system":
        if messages[0]["content"] != system:
            raise RecordError("bad_content", f"record-level {_SYSTEM_KEY!r} differs from the system message 0")
        return
    messages.insert(0, {"role": "system", "content": system})


def _normalize_message(i: int, raw, keys: FormatKeys, roles: dict[str, str]) -> tuple[dict, bool]:
    """One input message -> (normalised message, whether it is a ShareGPT-style tool call)."""
    if not isinstance(raw, dict):
        raise RecordError("bad_message", f"message {i}: expected an object, got {type(raw).__name__}")
    if raw.get(keys.role) is not None:
        source_role, content = raw[keys.role], raw.get(keys.content)
    elif raw.get(keys.from_) is not None:
        source_role, content = raw[keys.from_], raw.get(keys.value)
    else:
        found = ", ".join(sorted(map(str, raw))) or "none"
        raise RecordError(
            "unrecognized_format", f"message {i}: neither {keys.role!r} nor {keys.from_!r} key (keys: {found})"
        )
    target = roles.get(source_role) if isinstance(source_role, str) else None
    if target is None:
        raise RecordError("unknown_role", f"message {i}: role {source_role!r} (known: {', '.join(sorted(roles))})")
    text, reasoning, calls = _content(i, content)
    if target == "tool_call":  # the whole value is a JSON call (or a list of parallel calls)
        calls, text = calls + _parse_calls(i, text), ""
    calls += _message_tool_calls(i, raw)
    reasoning_field = raw.get("reasoning_content")
    if reasoning_field is not None:
        if not isinstance(reasoning_field, str):
            raise RecordError("bad_content", f"message {i}: reasoning_content must be a string")
        reasoning = reasoning_field + reasoning

    role = "assistant" if target == "tool_call" else target
    message = {"role": role, "content": text}
    if role != "assistant" and (calls or reasoning):
        what = "tool_calls" if calls else "reasoning_content"
        raise RecordError("bad_tool_call" if calls else "bad_content", f"message {i} ({role}) carries {what}")
    if role != "assistant" and text == "":
        raise RecordError("empty_content", f"message {i} ({source_role}): empty content")
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = reasoning
    _copy_ids(i, raw, message)
    train = _train_flag(i, raw)
    if train is not None:
        message["train"] = train
    return message, target == "tool_call"


def _content(i: int, content) -> tuple[str, str, list[dict]]:
    """(text, reasoning, tool calls) of a message content: a string, None or a list of parts."""
    if content is None:
        return "", "", []
    if isinstance(content, str):
        return content, "", []
    if not isinstance(content, list):
        found = type(content).__name__
        raise RecordError("bad_content", f"message {i}: content must be a string or a list of parts, got {found}")
    texts, reasoning, calls = [], [], []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise RecordError("bad_content", f"message {i} part {j}: expected an object, got {type(part).__name__}")
        # Parts read back from Arrow carry every field of the struct, unused ones as None.
        value = part.get("text") if part.get("text") is not None else part.get("value")
        kind = part.get("type")
        if kind == "tool_call":
            calls.extend(_parse_calls(i, value))
            continue
        if value is not None and not isinstance(value, str):
            raise RecordError("bad_content", f"message {i} part {j}: {kind} value must be a string")
        if kind == "text":
            texts.append(value or "")
        elif kind == "reasoning":
            reasoning.append(value or "")
        else:
            raise RecordError(
                "unsupported_content", f"message {i} part {j}: type {kind!r} (supported: text, reasoning, tool_call)"
            )
    return "".join(texts), "".join(reasoning), calls


def _parse_calls(i: int, value) -> list[dict]:
    """A JSON call or list of calls (string or already parsed) -> normalised tool calls."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordError("bad_tool_call", f"message {i}: tool call is not valid JSON ({e.msg})") from None
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise RecordError("bad_tool_call", f"message {i}: empty list of tool calls")
    return [_tool_call(i, call) for call in calls]


def _message_tool_calls(i: int, raw: dict) -> list[dict]:
    """OpenAI ``tool_calls`` (a list or its JSON text) and the legacy ``function_call`` object."""
    calls = raw.get("tool_calls")
    out = _parse_calls(i, calls) if calls not in (None, [], "") else []
    legacy = raw.get("function_call")
    if isinstance(legacy, dict):
        out.append(_tool_call(i, legacy))
    return out


def _tool_call(i: int, call) -> dict:
    if not isinstance(call, dict):
        raise RecordError("bad_tool_call", f"message {i}: a tool call must be an object, got {type(call).__name__}")
    if call.get("type") not in (None, "function"):
        raise RecordError("bad_tool_call", f"message {i}: tool call type {call.get('type')!r}, expected 'function'")
    fn = call["function"] if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise RecordError("bad_tool_call", f"message {i}: tool call without a name")
    args = fn.get("arguments")
    if args is None or args == "":
        args = {}
    elif isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            detail = f"message {i}: arguments of {name!r} are not valid JSON ({e.msg})"
            raise RecordError("bad_tool_call", detail) from None
    if not isinstance(args, dict):
        found = type(args).__name__
        raise RecordError("bad_tool_call", f"message {i}: arguments of {name!r} must be an object, got {found}")
    out = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(call.get("id"), str) and call["id"]:
        out["id"] = call["id"]
    return out


def _copy_ids(i: int, raw: dict, message: dict) -> None:
    for key in ("tool_call_id", "name"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise RecordError("bad_message", f"message {i}: {key} must be a string, got {type(value).__name__}")
        message[key] = value
    ids = raw.get("tool_call_ids")
    if message["role"] == "tool" and "tool_call_id" not in message and isinstance(ids, list) and len(ids) == 1:
        if isinstance(ids[0], str):
            message["tool_call_id"] = ids[0]


def _train_flag(i: int, raw: dict) -> bool | None:
    flag = raw.get("train")
    if flag is not None and not isinstance(flag, bool):
        raise RecordError("bad_train_flag", f"message {i}: train must be true or false, got {flag!r}")
    weight = raw.get("weight")
    if weight is None:
        return flag
    # bool is an int, so weight true/false is accepted; NaN compares unequal to 0 and 1.
    if not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise RecordError("bad_weight", f"message {i}: weight must be 0 or 1, got {weight!r}")
    if flag is not None and flag != bool(weight):
        raise RecordError("bad_train_flag", f"message {i}: train={flag} disagrees with weight={weight!r}")
    return bool(weight)


def _merge_tool_call(assistant: dict, call_message: dict, i: int) -> None:
    """Append a ShareGPT function_call message's calls to the assistant turn just before it."""
    flag, other = assistant.get("train"), call_message.get("train")
    if flag is not None and other is not None and flag != other:
        detail = f"message {i}: function_call train={other} differs from the assistant turn it joins"
        raise RecordError("bad_train_flag", detail)
    if flag is None and other is not None:
        assistant["train"] = other
    assistant.setdefault("tool_calls", []).extend(call_message["tool_calls"])


def _normalize_tools(raw) -> list[dict] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        if not raw.strip():
            return None
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RecordError("bad_tools", f"tools is a string but not JSON ({e.msg})") from None
    if not isinstance(raw, list):
        raise RecordError("bad_tools", f"tools must be a list, got {type(raw).__name__}")
    tools = []
    for k, tool in enumerate(raw):
        if not isinstance(tool, dict):
            raise RecordError("bad_tools", f"tool {k}: expected an object, got {type(tool).__name__}")
        if tool.get("type") not in (None, "function"):
            raise RecordError("bad_tools", f"tool {k}: type {tool.get('type')!r}, expected 'function'")
        fn = tool["function"] if isinstance(tool.get("function"), dict) else tool
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError("bad_tools", f"tool {k}: no name")
        fn = {key: value for key, value in fn.items() if key != "type"} if fn is tool else fn
        tools.append({"type": "function", "function": fn})
    return tools or None
