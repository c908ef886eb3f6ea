"""ChatMasker on the hermetic tiny tokenizer: exact supervised text per turn, modes, train
overrides, the straddling rule, non-prefix-stable templates and every MaskError path."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from megatron_sft.data.chat_masks import ChatMasker, MaskError
from megatron_sft.data.chat_spans import TokenIndex


def supervised_runs(text: str, offsets, loss_mask) -> list[str]:
    """Render text covered by each maximal run of supervised tokens."""
    runs, j = [], 0
    while j < len(loss_mask):
        if loss_mask[j]:
            k = j
            while k < len(loss_mask) and loss_mask[k]:
                k += 1
            runs.append(text[offsets[j][0]: offsets[k - 1][1]])
            j = k
        else:
            j += 1
    return runs


def encode_and_runs(tok, messages, tools=None, **kwargs):
    masker = ChatMasker(tok, **kwargs)
    enc = masker.encode(messages, tools=tools)
    text = tok.apply_chat_template(messages_without_train(messages), tools=tools, tokenize=False,
                                   chat_template=masker.chat_template, **(kwargs.get("template_kwargs") or {}))
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert enc.input_ids.dtype == np.int32 and enc.loss_mask.dtype == np.uint8
    assert len(enc.input_ids) == len(enc.loss_mask) == len(offsets)
    own = tok.apply_chat_template(messages_without_train(messages), tools=tools, tokenize=True, return_dict=False,
                                  chat_template=masker.chat_template, **(kwargs.get("template_kwargs") or {}))
    assert enc.input_ids.tolist() == list(own)
    return enc, supervised_runs(text, offsets, enc.loss_mask)


def messages_without_train(messages):
    return [{k: v for k, v in m.items() if k != "train"} for m in messages]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

AGENT_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Berlin?"},
    {"role": "assistant", "content": "", "reasoning_content": "I need the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Berlin"}}}]},
    {"role": "tool", "content": '{"temp_c": 20}'},
    {"role": "assistant", "content": "It is 20 degrees in Berlin.", "reasoning_content": "The tool said 20."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]

EXPECTED_AGENT_RUNS = [
    '<think>\nI need the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}'
    "\n</tool_call><|im_end|>",
    "<think>\nThe tool said 20.\n</think>\n\nIt is 20 degrees in Berlin.<|im_end|>",
    "You are welcome.<|im_end|>",
]


def test_multi_turn_tools_reasoning_exact_spans(tiny_tokenizer):
    enc, runs = encode_and_runs(tiny_tokenizer, AGENT_CHAT, tools=TOOLS)
    assert runs == EXPECTED_AGENT_RUNS
    assert enc.supervised_tokens_by_role == {"assistant": int(enc.loss_mask.sum())}
    decoded = tiny_tokenizer.decode(enc.input_ids[enc.loss_mask == 1].tolist())
    assert decoded == "".join(EXPECTED_AGENT_RUNS)
    for text in ("helpful assistant", "weather in Berlin?", "temp_c", "Thanks!", "<|im_start|>", "# Tools"):
        assert text not in decoded


def test_last_assistant_mode(tiny_tokenizer):
    _, runs = encode_and_runs(tiny_tokenizer, AGENT_CHAT, tools=TOOLS, mode="last_assistant")
    assert runs == ["You are welcome.<|im_end|>"]


def test_all_mode_counts_roles_by_span(tiny_tokenizer):
    enc, _ = encode_and_runs(tiny_tokenizer, AGENT_CHAT, tools=TOOLS, mode="all")
    assert enc.loss_mask.all()
    assistant_only = ChatMasker(tiny_tokenizer).encode(AGENT_CHAT, tools=TOOLS)
    counts = enc.supervised_tokens_by_role
    assert counts["assistant"] == int(assistant_only.loss_mask.sum())
    assert set(counts) == {"assistant", "system", "user", "tool", "template"}
    assert sum(counts.values()) == len(enc.input_ids)
    user_tokens = len(tiny_tokenizer("What is the weather in Berlin?")["input_ids"]) + len(tiny_tokenizer("Thanks!")["input_ids"])
    assert counts["user"] == user_tokens


def test_train_overrides(tiny_tokenizer):
    chat = [dict(m) for m in AGENT_CHAT]
    chat[4]["train"] = False  # drop the second assistant turn
    chat[5]["train"] = True   # supervise the user's content (not its header)
    enc, runs = encode_and_runs(tiny_tokenizer, chat, tools=TOOLS)
    assert runs == [EXPECTED_AGENT_RUNS[0], "Thanks!", EXPECTED_AGENT_RUNS[2]]
    assert enc.supervised_tokens_by_role["user"] == len(tiny_tokenizer("Thanks!")["input_ids"])

    chat = [dict(m) for m in AGENT_CHAT]
    chat[2]["train"] = True  # last_assistant mode, but this earlier turn is forced in
    _, runs = encode_and_runs(tiny_tokenizer, chat, tools=TOOLS, mode="last_assistant")
    assert runs == [EXPECTED_AGENT_RUNS[0], EXPECTED_AGENT_RUNS[2]]

    chat = [dict(m) for m in AGENT_CHAT]
    chat[6]["train"] = False  # mode all: the turn's span is zeroed
    enc, runs = encode_and_runs(tiny_tokenizer, chat, tools=TOOLS, mode="all")
    text = tiny_tokenizer.apply_chat_template(messages_without_train(chat), tools=TOOLS, tokenize=False)
    assert text.endswith("You are welcome.<|im_end|>\n")
    # everything but the dropped turn's span; the "\n" after its marker is outside the span
    assert runs == [text[: text.rindex("You are welcome.")], "\n"]


def test_straddling_rule_worked_example():
    # Module docstring example: span "Hi!<|eot|>" = chars [20, 30).
    offsets = np.array([[10, 19], [19, 21], [21, 23], [23, 28], [28, 31], [31, 31]])
    shuffled = offsets[[1, 0, 2, 3, 4, 5]]  # non-monotone offsets take the comparison path
    expected = {(10, 19): False, (19, 21): True, (21, 23): True, (23, 28): True, (28, 31): True, (31, 31): False}
    for offs in (offsets, shuffled):
        index = TokenIndex(offs)
        # [10,19) outside; [19,21) straddles the start; [28,31) straddles the end; zero-width never.
        assert index.cover([(20, 30)]).tolist() == [expected[tuple(o)] for o in offs.tolist()]
        assert not index.cover([(31, 40)]).any() and not index.cover([]).any()
        # several intervals at once, including two that touch the same token
        both = index.cover([(9, 10), (19, 20), (20, 21)]).tolist()
        assert both == [tuple(o) == (19, 21) for o in offs.tolist()]


def test_straddling_tokens_end_to_end(tiny_tokenizer):
    # An end marker that is not a special token: "]]" glues onto following punctuation.
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}ASSISTANT: {{ m.content }}]]"
                "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"},
            {"role": "user", "content": "Ok"}, {"role": "assistant", "content": "No"}]
    masker = ChatMasker(tiny_tokenizer, chat_template=template)
    enc = masker.encode(chat)
    text = tiny_tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False)
    offsets = np.array(tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])
    spans = []
    for content in ("Yes]]", "No]]"):
        start = text.index("ASSISTANT: " + content) + len("ASSISTANT: ")
        spans.append((start, start + len(content)))
    expected = [any(s < b and e > a for a, b in spans) for s, e in offsets]
    assert enc.loss_mask.astype(bool).tolist() == expected


def test_template_without_end_marker(tiny_tokenizer):
    template = ("{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}Assistant: {% endif %}")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"},
            {"role": "user", "content": "Ok"}, {"role": "assistant", "content": "No"}]
    enc = ChatMasker(tiny_tokenizer, chat_template=template).encode(chat)
    text = tiny_tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False)
    assert text == "User: Hi\nAssistant: Yes\nUser: Ok\nAssistant: No\n"
    offsets = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans = [(text.index("Yes"), text.index("Yes") + 3), (text.index("No"), text.index("No") + 2)]
    assert enc.loss_mask.astype(bool).tolist() == [any(s < b and e > a for a, b in spans) for s, e in offsets]


def test_number_of_renders_does_not_grow_with_turns(tiny_tokenizer):
    def renders_for(num_repeats: int) -> int:
        masker = ChatMasker(tiny_tokenizer)
        calls = []
        real = masker._render
        masker._render = lambda *a, **k: calls.append(1) or real(*a, **k)
        masker.encode(AGENT_CHAT[:2] + AGENT_CHAT[2:] * num_repeats, tools=TOOLS)
        return len(calls)

    # real render + marked render + end-marker probe (2) + one generation-prompt render per
    # kind of message before a turn (user, tool and, once repeated, assistant): the same for 6
    # and 60 assistant turns
    assert renders_for(1) == 6
    assert renders_for(2) == renders_for(20) == 7


# --- templates that are not prefix-stable (written here so the suite stays hermetic) ---------

MISTRAL_LIKE = (  # the system prompt goes into the LAST user turn, as Mistral v0.3 does
    "{% if messages[0].role == 'system' %}{% set sys = messages[0].content %}{% set msgs = messages[1:] %}"
    "{% else %}{% set msgs = messages %}{% endif %}"
    "{% set users = msgs | selectattr('role', 'equalto', 'user') | list %}<|endoftext|>"
    "{% for m in msgs %}{% if m.role == 'user' %}"
    "{% if m == users[-1] and sys is defined %}[INST] {{ sys }}\n\n{{ m.content }}[/INST]"
    "{% else %}[INST] {{ m.content }}[/INST]{% endif %}"
    "{% else %} {{ m.content | trim }}<|im_end|>{% endif %}{% endfor %}"
)

GEMMA_MERGED = (  # system text merged into the first user turn (Gemma-3 style)
    "{% if messages[0].role == 'system' %}{% set prefix = messages[0].content + '\n\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}<|im_start|>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{{ (prefix if loop.first else '') + m.content | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>model\n{% endif %}"
)

QWEN3_LIKE = (  # reasoning kept only after the last user turn
    "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.index0 > ns.last %}<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PLAIN_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris.", "reasoning_content": "Easy."},
    {"role": "user", "content": "And of Germany?"},
    {"role": "assistant", "content": "Berlin.\n", "reasoning_content": "Also easy."},
]


@pytest.mark.parametrize("template, expected", [
    (MISTRAL_LIKE, [" Paris.<|im_end|>", " Berlin.<|im_end|>"]),
    (GEMMA_MERGED, ["Paris.<|im_end|>", "Berlin.<|im_end|>"]),
    (QWEN3_LIKE, ["Paris.<|im_end|>", "<think>\nAlso easy.\n</think>\n\nBerlin.\n<|im_end|>"]),
])
def test_templates_that_are_not_prefix_stable(tiny_tokenizer, template, expected):
    chat = PLAIN_CHAT if template is not MISTRAL_LIKE else PLAIN_CHAT + [{"role": "user", "content": "Thanks"}]
    enc, runs = encode_and_runs(tiny_tokenizer, chat, chat_template=template)
    assert runs == expected
    text = tiny_tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False)
    assert "Be brief." in text and all("Be brief" not in r and "France" not in r for r in runs)


def test_marker_sensitive_template_uses_per_message_fallback(tiny_tokenizer):
    # Reacts to the total content length, so marking every message at once changes the render.
    template = ("{% if (messages | map(attribute='content') | join | length) > 24 %}LONG{% endif %}"
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    chat = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi friend!"}]
    assert len("".join(m["content"] for m in chat)) == 21
    _, runs = encode_and_runs(tiny_tokenizer, chat, chat_template=template)
    assert runs == ["Hi friend!<|im_end|>"]


def test_template_reacting_to_marked_text_is_refused(tiny_tokenizer):
    # The markers make content.startswith(...) false, which changes how ANOTHER message renders
    # (Qwen3 picks which turns keep their reasoning this way): that render is never taken for the
    # real one, and since marking the user message alone changes it too, there is no mask.
    template = ("{% set ns = namespace(tool=false) %}{% for m in messages %}"
                "{% if m.role == 'user' and m.content.startswith('<tool_response>') %}{% set ns.tool = true %}"
                "{% endif %}{% endfor %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
                "{% if m.role == 'assistant' and ns.tool %}T: {% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    chat = [{"role": "user", "content": "<tool_response>20 C</tool_response>"}, {"role": "assistant", "content": "Warm."}]
    with pytest.raises(MaskError) as err:
        ChatMasker(tiny_tokenizer, chat_template=template).encode(chat)
    assert err.value.reason == "span_not_found" and "message 0 (user)" in err.value.detail
    plain = [{"role": "user", "content": "20 C"}, chat[1]]
    _, runs = encode_and_runs(tiny_tokenizer, plain, chat_template=template)
    assert runs == ["Warm.<|im_end|>"]


def test_backend_truncation_is_not_applied(tiny_tokenizer_dir):
    # Truncation left enabled on the backend by other code never shortens the ids.
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    masker = ChatMasker(tok)
    masker.render_check_every = 1000
    full = masker.encode(AGENT_CHAT, tools=TOOLS).input_ids.tolist()
    tok._tokenizer.enable_truncation(max_length=8)
    assert masker.encode(AGENT_CHAT, tools=TOOLS).input_ids.tolist() == full
    assert len(full) > 8


# --- errors ------------------------------------------------------------------------------------

def test_bad_mode_is_value_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="mode"):
        ChatMasker(tiny_tokenizer, mode="assistants")


def test_no_chat_template(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tok.chat_template = None
    with pytest.raises(MaskError) as err:
        ChatMasker(tok).encode(PLAIN_CHAT)
    assert err.value.reason == "no_chat_template" and "chat_template=" in err.value.detail


def test_template_that_raises(tiny_tokenizer):
    template = "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    with pytest.raises(MaskError) as err:
        ChatMasker(tiny_tokenizer, chat_template=template).encode(PLAIN_CHAT)
    assert err.value.reason == "template_error" and "System role not supported" in err.value.detail
    assert isinstance(err.value, ValueError)


def test_template_that_rewrites_content(tiny_tokenizer):
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(MaskError) as err:
        ChatMasker(tiny_tokenizer, chat_template=template).encode(PLAIN_CHAT)
    assert err.value.reason == "span_not_found" and "rewrites" in err.value.detail


def test_template_that_echoes_user_text_into_the_reply(tiny_tokenizer):
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
                "{{ m.content }} (re: {{ messages[loop.index0 - 1].content }}){% else %}{{ m.content }}{% endif %}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(MaskError) as err:
        ChatMasker(tiny_tokenizer, chat_template=template).encode(PLAIN_CHAT)
    assert err.value.reason == "span_verification_failed" and "(user)" in err.value.detail


def test_render_mismatch(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    real = tok.apply_chat_template

    def drifting(*args, **kwargs):  # a template whose tokenized output differs from its text
        out = real(*args, **kwargs)
        return out + [0] if kwargs.get("tokenize", True) else out

    tok.apply_chat_template = drifting
    with pytest.raises(MaskError) as err:
        ChatMasker(tok).encode(PLAIN_CHAT)
    assert err.value.reason == "render_mismatch"


def test_render_is_rechecked_periodically(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    masker = ChatMasker(tok)
    masker.render_check_every = 2
    masker.encode(PLAIN_CHAT)  # 1st: checked (and the special-token convention decided)
    real = tok.apply_chat_template
    tok.apply_chat_template = lambda *a, **k: real(*a, **k) + [0] if k.get("tokenize", True) else real(*a, **k)
    masker.encode(PLAIN_CHAT)  # 2nd: not checked
    with pytest.raises(MaskError) as err:
        masker.encode(PLAIN_CHAT)  # 3rd: checked again
    assert err.value.reason == "render_mismatch"


def test_inputs_are_not_modified(tiny_tokenizer):
    chat = [dict(m) for m in AGENT_CHAT]
    chat[5]["train"] = True
    before = repr(chat)
    ChatMasker(tiny_tokenizer).encode(chat, tools=TOOLS)
    assert repr(chat) == before


def test_no_supervised_tokens(tiny_tokenizer):
    with pytest.raises(MaskError) as err:
        ChatMasker(tiny_tokenizer).encode(PLAIN_CHAT[:2])
    assert err.value.reason == "no_supervised_tokens"
    chat = [dict(m) for m in PLAIN_CHAT]
    chat[2]["train"] = chat[4]["train"] = False
    with pytest.raises(MaskError) as err:
        ChatMasker(tiny_tokenizer).encode(chat)
    assert err.value.reason == "no_supervised_tokens"
    empty = PLAIN_CHAT[:2] + [{"role": "assistant", "content": ""}]
    with pytest.raises(MaskError) as err:
        ChatMasker(tiny_tokenizer).encode(empty)
    assert err.value.reason == "no_supervised_tokens"


def test_assistant_first_and_reserved_characters(tiny_tokenizer):
    with pytest.raises(MaskError) as err:
        ChatMasker(tiny_tokenizer).encode([{"role": "assistant", "content": "Hello"}])
    assert err.value.reason == "span_not_found" and "starts with an assistant" in err.value.detail
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "odd \U000F0001 char"}]
    with pytest.raises(MaskError) as err:
        ChatMasker(tiny_tokenizer).encode(chat)
    assert err.value.reason == "span_not_found" and "U+F0000" in err.value.detail


def test_mask_error_fields():
    err = MaskError("span_not_found", "where and why")
    assert (err.reason, err.detail) == ("span_not_found", "where and why")
    assert str(err) == "span_not_found: where and why"


REASONING_PART = "{% if message.reasoning_content %}<think>\n{{ message.reasoning_content }}\n</think>\n\n{% endif %}"


@pytest.mark.parametrize("template_edit, not_rendered", [
    ("as is", 0),  # renders every turn's reasoning
    ("no reasoning", 2),  # Qwen2.5-like: renders none
    ("last only", 1),  # Qwen3-like: only the last message's
])
def test_reasoning_a_template_drops_is_counted(tiny_tokenizer, template_edit, not_rendered):
    from megatron_sft.testing.tiny_tokenizer import CHATML_TEMPLATE

    assert REASONING_PART in CHATML_TEMPLATE
    template = {"as is": CHATML_TEMPLATE,
                "no reasoning": CHATML_TEMPLATE.replace(REASONING_PART, ""),
                "last only": CHATML_TEMPLATE.replace("{% if message.reasoning_content %}",
                                                     "{% if message.reasoning_content and loop.last %}")}[template_edit]
    chat = AGENT_CHAT[:5]  # two assistant turns with reasoning, the second one last
    enc, runs = encode_and_runs(tiny_tokenizer, chat, chat_template=template)
    assert enc.reasoning_not_rendered == not_rendered
    supervised = "".join(runs)
    assert ("I need the tool." in supervised) == (template_edit == "as is")
    assert ("The tool said 20." in supervised) == (template_edit != "no reasoning")
    plain = ChatMasker(tiny_tokenizer, chat_template=template).encode([AGENT_CHAT[1], AGENT_CHAT[6]])
    assert plain.reasoning_not_rendered == 0  # no reasoning supplied, nothing lost
