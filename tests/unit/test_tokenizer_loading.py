"""--tokenizer as users type it: every way it can be unusable gives an error that names the folder,
what is wrong and the fix (not a transformers traceback or "install sentencepiece or tiktoken")."""

from __future__ import annotations

import json

import pytest

from megatron_sft.data.reports import CompileError
from megatron_sft.data.tokenizer_loading import load_tokenizer, resolve_tokenizer

FIXES = "Qwen/Qwen2.5-7B-Instruct"  # every "point it elsewhere" message shows what a hub name looks like


def _error(name) -> str:
    with pytest.raises(CompileError) as info:
        load_tokenizer(resolve_tokenizer(str(name)), shown=str(name))
    return str(info.value)


def test_missing_path(tmp_path):
    message = _error(tmp_path / "no_such_tokenizer")
    assert message.startswith(f"--tokenizer {tmp_path / 'no_such_tokenizer'}: no such folder")
    assert "tokenizer.json" in message and FIXES in message


def test_template_file_given_as_tokenizer(tmp_path):
    path = tmp_path / "chat_template.jinja"
    path.write_text("{{ messages }}")
    message = _error(path)
    assert "is a file: pass the folder" in message and f"--chat-template {path}" in message


def test_empty_folder(tmp_path):
    assert _error(tmp_path).startswith(f"--tokenizer {tmp_path} is an empty folder") and FIXES in _error(tmp_path)


def test_template_only_folder(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    message = _error(tmp_path)
    assert f"--tokenizer {tmp_path} holds a chat template ({tmp_path / 'chat_template.jinja'}) but no vocabulary" in message
    assert "Point --tokenizer at the model's own tokenizer" in message
    assert message.endswith(f"add --chat-template {tmp_path / 'chat_template.jinja'}")


def test_template_only_in_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    message = _error(tmp_path)
    assert "holds a chat template" in message and "no vocabulary" in message
    assert f"--chat-template FILE (the chat_template of {tmp_path / 'tokenizer_config.json'} saved as .jinja)" in message


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    message = _error(tmp_path)
    assert "holds no tokenizer files (found: config.json, model.safetensors)" in message and "tokenizer.json" in message


@pytest.mark.parametrize("name", ["llama-3.x-instruct", "gemma-2-it"])
def test_real_template_only_folders(name):
    from tests.conftest import fixture_path

    folder = fixture_path("tokenizers", name)  # skips when the fixtures are absent
    message = _error(folder)
    assert "holds a chat template" in message and f"--chat-template {folder / 'chat_template.jinja'}" in message


def test_invalid_hub_name():
    message = _error("not a hub name!")
    assert message.startswith("--tokenizer not a hub name!") and "not a valid Hugging Face hub name" in message


def test_unloadable_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ this is not a tokenizer")
    message = _error(tmp_path)
    assert message.startswith(f"--tokenizer {tmp_path}: transformers cannot load it (")
    assert "complete tokenizer folder" in message


def test_tokenizer_that_maps_text_to_unknown(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path)
    message = _error(tmp_path)
    assert "has 2 tokens" in message and "(unknown tokens)" in message and "vocabulary files" in message


def test_cli_reports_the_fix_without_traceback(tmp_path, capsys):
    from tools.preprocess_data import main

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "chat_template.jinja").write_text("{{ messages }}")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    code = main(["--input", str(data), "--tokenizer", str(tmp_path / "tok"), "--output-prefix", str(tmp_path / "out" / "sft"),
                 "--seq-length", "64", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: --tokenizer {tmp_path / 'tok'} holds a chat template")
    assert "Traceback" not in err and not (tmp_path / "out").exists()
