"""The compiler end to end with the tiny tokenizer: bad input of every kind, fail vs skip, atomic
output, workers 1 vs 2, truncate vs drop, mixture ratios, pseudo multi-turn; exact tokens/masks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_sft.data import PackedDataset
from megatron_sft.data import compiler as compiler_module
from megatron_sft.data.chat_masks import ChatMasker
from megatron_sft.data.compiler import CompileConfig, CompileError, compile_dataset
from megatron_sft.data.indexed import indexed_paths, meta_path, output_paths, report_path
from megatron_sft.testing.tiny_tokenizer import CHATML_TEMPLATE
from megatron_sft.data.tokenizer_identity import vocab_sha256

RAISING_TEMPLATE = (
    "{% for m in messages %}{% if 'BOOM' in m.content %}"
    "{{ raise_exception('BOOM is not allowed') }}{% endif %}{% endfor %}" + CHATML_TEMPLATE
)


def _conv(*pairs, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


GOOD_1 = _conv(("What is the capital of France?", "The capital of France is Paris."))
GOOD_2 = _conv(("add 1 and 2", "3"), ("and 4?", "7"), system="You are a helpful assistant.")
LONG = _conv(("Tell me about the fox.", "The quick brown fox jumps over the lazy dog. " * 12))

# (line bytes, reason when bad or None); line numbers are 1-based positions in this list.
LINES = [
    (json.dumps(GOOD_1), None),
    (json.dumps(GOOD_2), None),
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid_json"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "a"}]}), "unknown_role"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}), "empty_content"),
    (json.dumps({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]}), "empty_content"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no_assistant_turn"),
    (json.dumps(_conv(("say BOOM", "no"))), "template"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "non_utf8"),
    (json.dumps(LONG), "too_long"),
]
SEQ_LENGTH = 96


def _write_jsonl(path: Path, lines) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return path


@pytest.fixture
def data(tmp_path):
    return _write_jsonl(tmp_path / "data.jsonl", [line for line, _ in LINES])


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(RAISING_TEMPLATE)
    return path


@pytest.fixture
def masker(tiny_tokenizer):
    return ChatMasker(tiny_tokenizer, chat_template=RAISING_TEMPLATE)


def _config(tmp_path, tokenizer_dir, inputs, **overrides):
    values = dict(inputs=[str(p) for p in inputs], tokenizer=str(tokenizer_dir), output_prefix=str(tmp_path / "out" / "sft"),
                  seq_length=SEQ_LENGTH, on_error="skip", progress=False, seed=5)
    values.update(overrides)
    return CompileConfig(**values)


def _conversations(dataset: PackedDataset) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    """record_index -> (tokens, loss_mask, source_index) of every conversation in the file set."""
    found = {}
    for i in range(len(dataset)):
        item = dataset[i]
        cu = item["cu_seqlens"]
        for j, record in enumerate(item["record_index"].tolist()):
            assert record not in found
            found[record] = (item["tokens"][cu[j]:cu[j + 1]], item["loss_mask"][cu[j]:cu[j + 1]], int(item["source_index"][j]))
    return found


def _template_reason(masker) -> str:
    from megatron_sft.data.chat_masks import MaskError

    with pytest.raises(MaskError) as info:
        masker.encode(GOOD_1["messages"][:1] + [{"role": "assistant", "content": "BOOM"}])
    return info.value.reason


def test_skip_counts_every_bad_kind_and_keeps_exact_conversations(tmp_path, tiny_tokenizer_dir, tiny_tokenizer, data, template_file, masker):
    report = compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [data], chat_template=str(template_file)))
    expected = {}
    for line_no, (_, reason) in enumerate(LINES, start=1):
        if reason == "template":
            reason = _template_reason(masker)
        if reason:
            expected.setdefault(reason, []).append(f"{data}:{line_no}")
    assert {r: e["records"] for r, e in report["dropped"].items()} == {r: len(v) for r, v in expected.items()}
    for reason, locations in expected.items():
        assert [e.split(": ")[0] for e in report["dropped"][reason]["examples"]] == locations
    assert report["records_read"] == len(LINES) and report["records_kept"] == 2 and report["records_dropped"] == len(LINES) - 2
    assert report["truncated"] == 0 and report["conversations"] == 2

    dataset = PackedDataset(tmp_path / "out" / "sft")
    found = _conversations(dataset)
    assert sorted(found) == [0, 1]  # record_index = 0-based record number
    supervised_total = 0
    for record_index, record in ((0, GOOD_1), (1, GOOD_2)):
        encoded = masker.encode(record["messages"])
        tokens, loss_mask, source = found[record_index]
        assert source == 0
        assert np.array_equal(tokens, encoded.input_ids) and np.array_equal(loss_mask, encoded.loss_mask)
        # Exact spans: the supervised tokens are the assistant replies, each with its <|im_end|>.
        replies = [m["content"] + "<|im_end|>" for m in record["messages"] if m["role"] == "assistant"]
        runs = np.split(tokens, np.flatnonzero(np.diff(loss_mask.astype(np.int8))) + 1)
        supervised_runs = [tiny_tokenizer.decode(r) for r, m in zip(runs, np.split(loss_mask, np.flatnonzero(np.diff(loss_mask.astype(np.int8))) + 1)) if m[0] == 1]
        assert [s.strip("\n") for s in supervised_runs] == replies
        supervised_total += int(loss_mask.sum())
    assert report["supervised_tokens"]["total"] == supervised_total
    assert report["supervised_tokens"]["by_role"] == {"assistant": supervised_total}
    assert report["supervised_tokens"]["by_source"] == [supervised_total]
    assert report["real_tokens"] == dataset.num_tokens == sum(len(t) for t, _, _ in found.values())
    assert report["fill_ratio"] == pytest.approx(dataset.num_tokens / (len(dataset) * SEQ_LENGTH), abs=1e-6)
    meta = dataset.meta
    assert meta["seq_length"] == SEQ_LENGTH and meta["mode"] == "assistant" and meta["pack_seed"] == 5
    assert meta["chat_template"] == RAISING_TEMPLATE and len(meta["chat_template_sha256"]) == 64
    assert meta["tokenizer_vocab_sha256"] == vocab_sha256(tiny_tokenizer)
    assert meta["vocab_size"] == len(tiny_tokenizer) and meta["eos_token_id"] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert meta["end_of_turn_token_ids"] == [tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert meta["counts"]["num_conversations"] == 2 and meta["versions"]["megatron-core"].startswith("0.19")
    assert json.loads(Path(report_path(tmp_path / "out" / "sft")).read_text()) == report


def test_fail_stops_at_first_bad_record_and_leaves_nothing(tmp_path, tiny_tokenizer_dir, data):
    with pytest.raises(CompileError, match=rf"^{data}:3: invalid_json: "):
        compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [data], on_error="fail"))
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_fail_on_each_kind(tmp_path, tiny_tokenizer_dir, template_file, masker):
    for line_no, (line, reason) in enumerate(LINES[2:], start=2):
        path = _write_jsonl(tmp_path / f"one_{line_no}.jsonl", [LINES[0][0], line])
        reason = _template_reason(masker) if reason == "template" else reason
        config = _config(tmp_path, tiny_tokenizer_dir, [path], on_error="fail", chat_template=str(template_file))
        with pytest.raises(CompileError, match=rf"^{path}:2: {reason}: "):
            compile_dataset(config)
    assert os.listdir(tmp_path / "out") == []


def test_interrupted_before_publish_leaves_no_files(tmp_path, tiny_tokenizer_dir, data, monkeypatch):
    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(compiler_module, "_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [data]))
    assert os.listdir(tmp_path / "out") == []  # no final files, no temporary folder


def test_existing_output_refused_unless_overwrite(tmp_path, tiny_tokenizer_dir, data):
    first = compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [data]))  # no raising template: BOOM is kept
    with pytest.raises(CompileError, match=r"--output-prefix .*sft exists already \(.*sft_tokens.bin.*\): pass --overwrite"):
        compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [data], limit=1))
    assert PackedDataset(tmp_path / "out" / "sft").meta["counts"]["num_conversations"] == first["conversations"] == 3
    second = compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [data], limit=1, overwrite=True))
    assert first["records_read"] == len(LINES) and second["records_read"] == 1
    dataset = PackedDataset(tmp_path / "out" / "sft")
    assert dataset.meta["counts"]["num_conversations"] == second["conversations"] == 1
    assert sorted(_conversations(dataset)) == [0]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.path.basename(p) for p in output_paths(tmp_path / "out" / "sft"))


def test_no_chat_template(tmp_path, tiny_tokenizer_dir, data):
    bare = tmp_path / "bare_tokenizer"
    shutil.copytree(tiny_tokenizer_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config_path = bare / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    with pytest.raises(CompileError, match="no chat template.*--chat-template"):
        compile_dataset(_config(tmp_path, bare, [data]))
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_tokenizer_without_vocabulary_files_is_refused(tmp_path, data):
    """A template-only folder (tokenizer_config.json, no vocabulary) would load in transformers as
    a 7-token Gemma tokenizer mapping every word to <unk>: refused before anything is encoded,
    with the fix (tests/unit/test_tokenizer_loading.py has every other case)."""
    from tests.conftest import fixture_path

    folder = fixture_path("tokenizers", "gemma-2-it")  # skips when the fixtures are absent
    with pytest.raises(CompileError, match=r"holds a chat template .* but no vocabulary .* add --chat-template "):
        compile_dataset(_config(tmp_path, folder, [data], workers=2))
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_too_long_under_fail_names_every_fix(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD_1), json.dumps(LONG)])
    length = ChatMasker(tiny_tokenizer).encode(LONG["messages"]).input_ids.size
    with pytest.raises(CompileError) as info:
        compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [path], on_error="fail"))
    assert str(info.value) == (
        f"{path}:2: too_long: {length} tokens > --seq-length {SEQ_LENGTH}; pass --overlength truncate to keep its "
        f"first {SEQ_LENGTH} tokens, --on-error skip to drop it (counted in the report), or --seq-length {length} or more")


def test_unrecognized_format_under_fail_names_the_key_flag(tmp_path, tiny_tokenizer_dir):
    history = {"id": 7, "history": GOOD_1["messages"]}
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(history)])
    with pytest.raises(CompileError, match=r"d.jsonl:1: unrecognized_format: no 'messages' or 'conversations' key "
                                           r"\(keys present: history, id\); 'history' holds 'role'-keyed messages: "
                                           r"pass --messages-key history; pass --on-error skip"):
        compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [path], on_error="fail", workers=2))
    from megatron_sft.data.formats import FormatKeys

    report = compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [path], format_keys=FormatKeys(messages="history")))
    assert report["records_kept"] == 1


def test_reasoning_the_template_drops_is_counted_and_warned_once(tmp_path, tiny_tokenizer_dir, caplog):
    from megatron_sft.testing.tiny_tokenizer import CHATML_TEMPLATE

    reasoning = "{% if message.reasoning_content %}<think>\n{{ message.reasoning_content }}\n</think>\n\n{% endif %}"
    template = tmp_path / "no_reasoning.jinja"
    template.write_text(CHATML_TEMPLATE.replace(reasoning, ""))
    thinking = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r1"},
                             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b", "reasoning_content": "r2"}]}
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD_1), json.dumps(thinking), json.dumps(thinking)])
    for template_file, expected in ((None, {"records": 0, "turns": 0, "examples": []}),
                                    (str(template), {"records": 2, "turns": 4, "examples": [f"{path}:2", f"{path}:3"]})):
        caplog.clear()
        report = compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [path], chat_template=template_file, overwrite=True))
        assert report["reasoning_not_rendered"] == expected and report["records_kept"] == 3
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        if template_file is None:
            assert not warnings
        else:
            assert len(warnings) == 1 and warnings[0].startswith("4 assistant turn(s) in 2 record(s) carry reasoning_content")
            assert f"(e.g. {path}:2)" in warnings[0] and "--chat-template FILE" in warnings[0]
            assert "reasoning not rendered by the template: 4 turns in 2 records" in compiler_module.format_summary(report)


def test_report_timing(tmp_path, tiny_tokenizer_dir):
    path = _many_records(tmp_path, "many.jsonl", 40)
    for workers in (1, 2):
        timing = compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [path], workers=workers, overwrite=True))["timing_s"]
        assert set(timing) == {"startup_s", "encode_s", "parent_busy_s", "parent_cpu_s", "wait_s", "workers_cpu_s",
                               "worker_startup_s", "import_wait_s", "import_cpu_s", "pack_write_s", "total_s"}
        parts = timing["startup_s"] + timing["encode_s"] + timing["import_wait_s"] + timing["pack_write_s"]
        assert timing["total_s"] >= parts - 0.002  # values are rounded to ms
        assert timing["workers_cpu_s"] > 0 and (timing["wait_s"] > 0) == (workers == 2)
        assert (timing["worker_startup_s"] > 0) == (workers == 2)  # the in-process encoder starts within the parent


def _many_records(tmp_path, name, count, offset=0):
    rng = np.random.default_rng(offset)
    lines = []
    for i in range(count):
        answer = " ".join(["fox", "dog", "Paris", "brown", "lazy"][j % 5] for j in range(int(rng.integers(1, 40))))
        lines.append(json.dumps(_conv((f"question {offset + i}", answer))))
    return _write_jsonl(tmp_path / name, lines)


def test_workers_1_and_2_write_identical_bytes(tmp_path, tiny_tokenizer_dir):
    path = _many_records(tmp_path, "many.jsonl", 150)
    bad = _write_jsonl(tmp_path / "bad.jsonl", [line for line, _ in LINES])
    reports = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}" / "sft"
        reports.append(compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [path, bad], workers=workers, output_prefix=str(prefix))))
    for one, two in zip(indexed_paths(tmp_path / "w1" / "sft"), indexed_paths(tmp_path / "w2" / "sft")):
        assert Path(one).read_bytes() == Path(two).read_bytes()
    drop = ("workers", "elapsed_s", "tokens_per_s", "output_prefix", "timing_s")
    assert {k: v for k, v in reports[0].items() if k not in drop} == {k: v for k, v in reports[1].items() if k not in drop}
    assert reports[0]["conversations"] == 153  # 150 + GOOD_1, GOOD_2 and BOOM (no raising template here)


def test_truncate_vs_drop(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD_1), json.dumps(LONG)])
    full = ChatMasker(tiny_tokenizer).encode(LONG["messages"])
    assert full.input_ids.size > SEQ_LENGTH
    dropped = compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [path], output_prefix=str(tmp_path / "drop" / "sft")))
    assert dropped["dropped"]["too_long"]["records"] == 1 and dropped["truncated"] == 0
    assert f"{full.input_ids.size} tokens > --seq-length {SEQ_LENGTH}" in dropped["dropped"]["too_long"]["examples"][0]
    truncated = compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [path], overlength="truncate", output_prefix=str(tmp_path / "trunc" / "sft")))
    assert "too_long" not in truncated["dropped"] and truncated["truncated"] == 1 and truncated["records_kept"] == 2
    tokens, loss_mask, _ = _conversations(PackedDataset(tmp_path / "trunc" / "sft"))[1]
    assert np.array_equal(tokens, full.input_ids[:SEQ_LENGTH]) and np.array_equal(loss_mask, full.loss_mask[:SEQ_LENGTH])
    assert truncated["supervised_tokens"]["by_role"]["assistant"] == int(loss_mask.sum()) + dropped["supervised_tokens"]["total"]
    with pytest.raises(CompileError, match=r"d.jsonl:2: too_long: "):
        compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [path], on_error="fail"))


def test_mixture_ratios(tmp_path, tiny_tokenizer_dir):
    a = _many_records(tmp_path, "a.jsonl", 40)
    b = _many_records(tmp_path, "b.jsonl", 30, offset=1000)
    report = compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [a, b], mixture_ratios=[2.0, 0.5]))
    assert [m["records_used"] for m in report["mixture"]] == [80, 15]
    assert [m["records_kept"] for m in report["mixture"]] == [80, 15]
    found_sources = []
    dataset = PackedDataset(tmp_path / "out" / "sft")
    records = []
    for i in range(len(dataset)):
        found_sources += dataset[i]["source_index"].tolist()
        records += dataset[i]["record_index"].tolist()
    assert found_sources.count(0) == 80 and found_sources.count(1) == 15
    a_records = sorted(r for r, s in zip(records, found_sources) if s == 0)
    assert a_records == sorted(list(range(40)) * 2)  # every record of a exactly twice
    b_records = [r for r, s in zip(records, found_sources) if s == 1]
    assert len(set(b_records)) == 15 and all(40 <= r < 70 for r in b_records)
    assert report["supervised_tokens"]["total"] == sum(report["supervised_tokens"]["by_source"])


def test_pseudo_multiturn_merges_and_keeps_provenance(tmp_path, tiny_tokenizer_dir):
    path = _many_records(tmp_path, "single.jsonl", 30)
    report = compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [path], seq_length=512,
                                     pseudo_multiturn_prob=1.0, pseudo_multiturn_max_turns=3))
    assert report["records_kept"] == 30 and report["conversations"] == 10
    assert report["pseudo_multiturn"] == {"conversations_in": 30, "conversations_out": 10, "merged_conversations": 10}
    found = _conversations(PackedDataset(tmp_path / "out" / "sft"))
    assert sorted(found) == list(range(0, 30, 3))  # a merged conversation carries its first record


def test_packs_deterministic_and_seed_dependent(tmp_path, tiny_tokenizer_dir):
    path = _many_records(tmp_path, "many.jsonl", 120)
    contents = []
    for run, seed in enumerate((1, 1, 2)):
        prefix = tmp_path / f"s{run}" / "sft"
        compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [path], seed=seed, output_prefix=str(prefix)))
        dataset = PackedDataset(prefix)
        packs = [dataset[i]["record_index"].tolist() for i in range(len(dataset))]
        for i in range(len(dataset)):
            assert dataset[i]["cu_seqlens"][-1] == dataset[i]["tokens"].size <= SEQ_LENGTH
        assert sorted(sum(packs, [])) == list(range(120))
        contents.append(packs)
    assert contents[0] == contents[1] and contents[0] != contents[2]


def test_invalid_settings_listed_at_once(tmp_path, tiny_tokenizer_dir, data):
    with pytest.raises(ValueError) as info:
        compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [data, tmp_path / "nope.jsonl"], seq_length=0,
                                workers=0, mixture_ratios=[1.0], on_error="ignore"))
    message = str(info.value)
    for needle in ("nope.jsonl does not exist", "--seq-length", "--workers", "--mixture-ratios has 1 values", "--on-error"):
        assert needle in message


# ---------------------------------------------------------------- real fixtures (skipped when absent)

FIXTURE_DATASETS = [
    "llamafactory_glaive_toolcall_en_demo.json",
    "llamafactory_reason_tool_use_demo_50.jsonl",
    "openai_cookbook_toy_chat_fine_tuning.jsonl",
    "axolotl_conversation.json",
    "axolotl_conversation.missingturns.json",
]


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    from tests.conftest import fixture_path

    tokenizer = fixture_path("tokenizers", "qwen2.5-instruct")
    inputs = [fixture_path("datasets", name) for name in FIXTURE_DATASETS]
    out = tmp_path_factory.mktemp("fixtures")
    config = CompileConfig(inputs=[str(p) for p in inputs], tokenizer=str(tokenizer), output_prefix=str(out / "sft"),
                           seq_length=16384, on_error="skip", progress=False, workers=1)
    return config, compile_dataset(config), PackedDataset(out / "sft")


def test_fixture_datasets_compile(fixture_run):
    from transformers import AutoTokenizer

    from megatron_sft.data.formats import count_records

    config, report, dataset = fixture_run
    counts = [count_records(p) for p in config.inputs]
    assert report["records_read"] == sum(counts) == 300 + 50 + 5 + 1 + 1
    assert report["records_kept"] + report["records_dropped"] == report["records_read"]
    # The malformed axolotl file (first gpt turn empty) is dropped with its reason and location.
    assert any(e.startswith(config.inputs[4]) for e in report["dropped"]["empty_content"]["examples"])
    found = _conversations(dataset)
    assert len(found) == report["conversations"] == report["records_kept"]
    by_source = [0] * len(config.inputs)
    for tokens, loss_mask, source in found.values():
        assert 0 < loss_mask.sum() < tokens.size
        by_source[source] += int(loss_mask.sum())
    assert by_source == report["supervised_tokens"]["by_source"]
    assert report["supervised_tokens"]["by_role"] == {"assistant": report["supervised_tokens"]["total"]}
    # Spot check exact content: the single axolotl conversation's six replies are the supervised text.
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    axolotl_record = 300 + 50 + 5  # record_index counts over all inputs
    tokens, loss_mask, source = found[axolotl_record]
    supervised_text = tokenizer.decode(tokens[loss_mask == 1])
    raw = json.loads(Path(config.inputs[3]).read_text())
    replies = [m["value"] for m in raw["conversations"] if m["from"] == "gpt"]
    assert source == 3 and len(replies) == 6
    assert supervised_text == "".join(r + "<|im_end|>" for r in replies) or all(r in supervised_text for r in replies)
    assert supervised_text.count("<|im_end|>") == 6


@pytest.mark.parametrize("seq_length", [16384, 131072])
def test_fill_ratio_on_fixture_length_mix(fixture_run, seq_length):
    """BFD needs many small items to fill: the fixtures' conversation lengths, replicated, fill
    >= 99% of 16K and 128K packs."""
    from megatron_sft.data.packing import pack_lengths, packing_stats

    _, _, dataset = fixture_run
    lengths = dataset.conversation_lengths
    replicas = int(np.ceil(200 * seq_length / lengths.sum()))  # enough tokens for ~200 packs
    mix = np.tile(lengths, replicas)
    packs = pack_lengths(mix, seq_length, seed=0)
    assert packing_stats(packs, mix, seq_length).fill_ratio >= 0.99


def test_upsampled_records_with_pseudo_multiturn(tmp_path, tiny_tokenizer_dir):
    # A record used twice (ratio 2) arrives twice in a row; pseudo multi-turn never merges a record
    # with its own copy, and each copy keeps its own location (a regression: the second copy's
    # location used to be looked up after the first had removed it).
    path = _many_records(tmp_path, "single.jsonl", 12)
    report = compile_dataset(_config(tmp_path, tiny_tokenizer_dir, [path], seq_length=512, mixture_ratios=[2.0],
                                     pseudo_multiturn_prob=1.0, pseudo_multiturn_max_turns=2))
    assert report["mixture"][0]["records_used"] == 24 and report["records_kept"] == 24
    dataset = PackedDataset(tmp_path / "out" / "sft")
    firsts = sorted(r for i in range(len(dataset)) for r in dataset[i]["record_index"].tolist())
    assert len(firsts) == report["conversations"] == 24 - report["pseudo_multiturn"]["merged_conversations"]
    assert set(firsts) <= set(range(12))
