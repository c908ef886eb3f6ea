"""tools/preprocess_data.py's settings: --config files and flags through the trainer's strict
loader into CompileConfig, flags and --help generated from its fields (in-process, no compiling)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_sft.config import ConfigError, field_docs
from megatron_sft.data.compile_settings import CompileConfig
from megatron_sft.data.formats import FormatKeys
from megatron_sft.errors import InputError
from tools.preprocess_data import config_from_args, parse_args

REPO_ROOT = Path(__file__).resolve().parents[2]


def _config(*argv):
    return config_from_args(parse_args([str(a) for a in argv]))


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative input paths are checked from here
    for name in ("a.jsonl", "b.jsonl", "chat.jinja"):
        (tmp_path / name).write_text("")
    return tmp_path


def test_every_old_flag_spelling_maps_as_before(files):
    argv = ["--input", "a.jsonl,b.jsonl", "--tokenizer", "tok", "--output-prefix", "out/sft", "--seq-length", "2048",
            "--chat-template", "chat.jinja", "--mode", "all", "--workers", "3", "--on-error", "skip",
            "--overlength", "truncate", "--mixture-ratios", "1.0,0.5", "--pseudo-multiturn-prob", "0.25",
            "--pseudo-multiturn-max-turns", "3", "--seed", "7", "--messages-key", "history",
            "--conversations-key", "conv", "--tools-key", "functions", "--limit", "100", "--num-shards", "4",
            "--shard-index", "2", "--overwrite", "--no-progress"]
    # What the hand-written argparse table's config_from_args built from this command line.
    expected = CompileConfig(
        inputs=["a.jsonl", "b.jsonl"], tokenizer="tok", output_prefix="out/sft", seq_length=2048,
        chat_template="chat.jinja", mode="all", workers=3, on_error="skip", overlength="truncate",
        mixture_ratios=[1.0, 0.5], pseudo_multiturn_prob=0.25, pseudo_multiturn_max_turns=3, seed=7,
        format_keys=FormatKeys(messages="history", conversations="conv", tools="functions"), limit=100,
        num_shards=4, shard_index=2, progress=False, overwrite=True)
    assert _config(*argv) == expected


def test_required_flags_alone_give_the_defaults(files):
    config = _config("--input", "a.jsonl", "--tokenizer", "tok", "--output-prefix", "o", "--seq-length", "64")
    assert config == CompileConfig(inputs=["a.jsonl"], tokenizer="tok", output_prefix="o", seq_length=64)
    ratios = _config("--input", "a.jsonl,b.jsonl", "--tokenizer", "t", "--output-prefix", "o", "--seq-length", "8",
                     "--mixture-ratios", "1,2").mixture_ratios
    assert ratios == [1.0, 2.0] and all(type(r) is float for r in ratios)
    # argparse's abbreviations keep working: each old flag is still the only one with its prefix
    assert _config("--inp", "a.jsonl", "--tok", "tok", "--output-p", "o", "--seq-l", "64") == config


def test_yaml_files_in_order_then_flags_override(files):
    (files / "base.yaml").write_text("inputs: [a.jsonl]\ntokenizer: tok\nseq_length: 1024\nworkers: 2\n"
                                     "format_keys: {messages: history, tools: functions}\n")
    (files / "more.yaml").write_text("seq_length: 2048\nformat_keys: {tools: tool_schemas}\noutput_prefix: o\n")
    config = _config("--config", "base.yaml", "--config", "more.yaml", "--workers", "5", "--input", "a.jsonl,b.jsonl",
                     "--no-progress")
    assert config == CompileConfig(
        inputs=["a.jsonl", "b.jsonl"], tokenizer="tok", output_prefix="o", seq_length=2048, workers=5,
        format_keys=FormatKeys(messages="history", tools="tool_schemas"), progress=False)


def test_the_shipped_example_yaml_loads(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    config = _config("--config", "yaml_configs/preprocess_example.yaml", "--tokenizer", "tok", "--output-prefix", "o",
                     "--workers", "1")
    assert config.inputs == ["examples/data/sample_conversations.jsonl"] and config.seq_length == 4096
    assert config.workers == 1 and config.on_error == "skip" and config.mixture_ratios == [1.0]


def test_unknown_yaml_keys_name_the_key_and_the_file(files):
    (files / "bad.yaml").write_text("inputs: [a.jsonl]\nseq_lenght: 8\nformat_keys: {mesages: m}\n")
    with pytest.raises(ConfigError) as err:
        _config("--config", "bad.yaml", "--tokenizer", "t", "--output-prefix", "o", "--seq-length", "8")
    assert err.value.issues == [
        "bad.yaml: unknown key 'seq_lenght'; did you mean 'seq_length'?",
        "bad.yaml: unknown key 'format_keys.mesages'; did you mean 'format_keys.messages'?",
    ]


def test_bad_types_and_missing_required_are_reported_together_naming_flag_and_file(files):
    (files / "c.yaml").write_text("inputs: [a.jsonl]\nworkers: many\n")
    with pytest.raises(ConfigError) as err:
        _config("--config", "c.yaml", "--seq-length", "abc", "--mixture-ratios", "1,x", "--tokenizer", "t")
    issues = err.value.issues
    assert len(issues) == 4, issues
    assert issues[0].startswith("missing required key 'output_prefix'")
    assert issues[0].endswith("pass --output-prefix or give output_prefix: in a --config file")
    assert "--seq-length: 'seq_length' = 'abc': expected int" in issues
    assert "c.yaml: 'workers' = 'many': expected int" in issues
    assert "--mixture-ratios: 'mixture_ratios' = [1, 'x']: expected a list of float or null" in issues


def test_a_flag_overrides_a_bad_file_value_and_validate_still_runs(files):
    (files / "c.yaml").write_text("workers: many\ninputs: [a.jsonl]\nmixture_ratios: [1, 2]\n")
    with pytest.raises(InputError) as err:  # the file's bad workers is replaced by the flag's
        _config("--config", "c.yaml", "--workers", "0", "--tokenizer", "t", "--output-prefix", "o", "--seq-length", "8")
    assert "--mixture-ratios has 2 values for 1 inputs" in str(err.value) and "--workers must be >= 1" in str(err.value)


def test_help_lists_every_setting_with_its_docstring_type_and_default(capsys):
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    assert done.value.code == 0
    flat = "".join(capsys.readouterr().out.split())  # argparse re-wraps the docstrings
    docs = field_docs(CompileConfig)
    for f in dataclasses.fields(CompileConfig):
        if f.name != "format_keys":
            assert "".join(docs[f.name].split()) in flat, f.name
    for name, doc in field_docs(FormatKeys).items():
        assert "".join(doc.split()) in flat, name
    assert "--pseudo-multiturn-prob" in flat and "(float;default0.0)" in flat
    assert "--seq-lengthSEQ_LENGTHPackcapacityinrealtokens.(int;required)" in flat
    assert "--no-progress" in flat and "--format-keys.role-map" in flat and "--config" in flat
