"""File-level errors of both conversions (raised before any checkpoint is written) and the
HF-side helpers: streaming safetensors writer, end-of-turn detection, generation config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_sft.conversion.common import ConversionError, UnsupportedArchitectureError
from megatron_sft.conversion.convert import hf_to_megatron, megatron_to_hf
from megatron_sft.conversion.hf_io import ShardedSafetensorsWriter, end_of_turn_token, generation_config
from megatron_sft.testing.tiny_models import build_tiny_hf_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tiny_tokenizer_dir):
    path = tmp_path_factory.mktemp("hf") / "llama"
    build_tiny_hf_model("llama", str(path), tokenizer_dir=str(tiny_tokenizer_dir))
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(ConversionError, match="nope is not a local folder .* and not a valid Hugging Face hub name"):
        hf_to_megatron(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="HF config.json not found"):
        hf_to_megatron(tmp_path / "empty", tmp_path / "out")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty huggingface_hub cache, offline, with an endpoint that refuses connections."""
    from tests.hf_cache import offline_hub_cache

    return offline_hub_cache(tmp_path, monkeypatch)


def test_hub_names_for_model_and_tokenizer(tiny_llama, tmp_path, offline_hub):
    from tests.hf_cache import add_to_hub_cache

    add_to_hub_cache(offline_hub, "tiny-org/tiny-llama", tiny_llama)
    cfg = hf_to_megatron("tiny-org/tiny-llama", tmp_path / "out", progress=False)
    assert cfg.num_layers == 2 and (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()
    assert "checkpoint tiny-org/tiny-llama" in (tmp_path / "out" / "config.yaml").read_text()
    out = megatron_to_hf(tmp_path / "out", tmp_path / "hf_out", tokenizer="tiny-org/tiny-llama", progress=False)
    assert (out / "tokenizer.json").read_bytes() == (tiny_llama / "tokenizer.json").read_bytes()
    with pytest.raises(ConversionError, match="not-cached: not a local folder, and the Hugging Face cache"):
        megatron_to_hf(tmp_path / "out", tmp_path / "hf_out2", tokenizer="tiny-org/not-cached", progress=False)


def test_cli_reports_an_unresolvable_name_with_exit_code_2(tmp_path, offline_hub, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_cli", REPO / "tools" / "convert_hf_to_megatron.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--hf", "Qwen/Qwen2.5-0.5B-Instruct", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Qwen/Qwen2.5-0.5B-Instruct: not a local folder") and "HF_HUB_OFFLINE=1" in err
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_file(tiny_llama, tmp_path):
    hf = _copy(tiny_llama, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(UnsupportedArchitectureError, match="gpt_neox"):
        hf_to_megatron(hf, tmp_path / "out")


def test_missing_weights_and_missing_shard(tiny_llama, tmp_path):
    hf = _copy(tiny_llama, tmp_path / "hf")
    (hf / "model.safetensors").rename(hf / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="no model.safetensors.index.json or model.safetensors.*pytorch_model.bin"):
        hf_to_megatron(hf, tmp_path / "out")
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ConversionError, match="missing: \\['model-00001-of-00002.safetensors'\\]"):
        hf_to_megatron(hf, tmp_path / "out")


def test_missing_and_unexpected_tensors(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    hf = _copy(tiny_llama, tmp_path / "hf")
    weights = load_file(str(hf / "model.safetensors"))
    weights.pop("model.layers.1.mlp.up_proj.weight")
    weights["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2)
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="missing \\['model.layers.1.mlp.up_proj.weight'\\], "
                                              "unexpected \\['model.layers.0.mlp.extra_proj.weight'\\]"):
        hf_to_megatron(hf, tmp_path / "out")


def test_no_tokenizer_and_bad_layout_and_nonempty_out(tiny_llama, tmp_path):
    hf = _copy(tiny_llama, tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (hf / name).unlink(missing_ok=True)
    with pytest.raises(ConversionError, match="no tokenizer files"):
        hf_to_megatron(hf, tmp_path / "out")
    with pytest.raises(ConversionError, match="num_query_groups=2 is not divisible by tensor_model_parallel_size=4"):
        hf_to_megatron(tiny_llama, tmp_path / "out", tensor_model_parallel_size=4)
    with pytest.raises(ConversionError, match="num_layers=2 is not divisible by pipeline stages x virtual chunks = 3 x 1"):
        hf_to_megatron(tiny_llama, tmp_path / "out", pipeline_model_parallel_size=3)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        hf_to_megatron(tiny_llama, tmp_path / "busy")


def test_tokenizer_larger_than_the_vocabulary(tmp_path, tiny_tokenizer_dir):
    hf = tmp_path / "small_vocab"
    build_tiny_hf_model("llama", str(hf), tokenizer_dir=str(tiny_tokenizer_dir), vocab_size=256)
    with pytest.raises(ConversionError, match=r"has \d+ tokens but the model's vocab_size \(embedding rows\) is 256"):
        hf_to_megatron(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_errors(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        megatron_to_hf(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="is not a checkpoint"):
        megatron_to_hf(tmp_path / "empty", tmp_path / "out")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text("{}")
    with pytest.raises(ConversionError, match="config.yaml not found"):
        megatron_to_hf(ckpt, tmp_path / "out")
    (ckpt / "config.yaml").write_text("model:\n  num_layers: 2\n  hidden_sise: 8\n")
    with pytest.raises(ConversionError, match="unknown key 'model.hidden_sise'; did you mean 'model.hidden_size'"):
        megatron_to_hf(ckpt, tmp_path / "out")


def test_sharded_writer_splits_and_indexes(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=100)
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    for key, value in tensors.items():
        writer.add(key, value)
    names = writer.close()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 200
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    loaded = {k: v for n in names for k, v in load_file(str(tmp_path / n)).items()}
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert not list(tmp_path.glob(".shard-*"))


LLAMA3_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
                   "{{ m.content }}<|eot_id|>{% endfor %}")


def test_end_of_turn_token_and_generation_config(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))  # our own copy: we add tokens
    assert end_of_turn_token(tok) == "<|im_end|>"
    # A template whose end-of-turn token is not the tokenizer's eos: it joins the eos list.
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    assert end_of_turn_token(tok, LLAMA3_TEMPLATE) == "<|eot_id|>"
    gen = generation_config({"eos_token_id": 7, "temperature": 0.6}, tok, LLAMA3_TEMPLATE, model_eos=[7, 2])
    assert gen["eos_token_id"] == [7, 2, tok.convert_tokens_to_ids("<|eot_id|>")]
    assert gen["temperature"] == 0.6
