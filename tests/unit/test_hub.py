"""megatron_sft.hub.resolve_hf_dir: a local folder wins, then the hub cache (offline), then a
download; a clear error naming both possibilities otherwise. The cache is built on disk in the
layout huggingface_hub writes (tests/hf_cache.py); the network is never used."""

from __future__ import annotations

import os

import pytest

from megatron_sft.hub import HubError, resolve_hf_dir
from tests.hf_cache import add_to_hub_cache

NAME = "tiny-org/tiny-qwen2"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    from megatron_sft.testing.tiny_models import build_tiny_hf_model

    out = tmp_path_factory.mktemp("hf") / "tiny-qwen2"
    build_tiny_hf_model("qwen2", str(out), tokenizer_dir=str(tiny_tokenizer_dir))
    return out


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache, offline, with an endpoint that refuses connections (never the real hub)."""
    from tests.hf_cache import offline_hub_cache

    return offline_hub_cache(tmp_path, monkeypatch)


def test_a_local_folder_wins_over_the_cache(hub, tiny_model_dir, tmp_path, monkeypatch):
    add_to_hub_cache(hub, NAME, tiny_model_dir)
    local = tmp_path / "work" / NAME
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_hf_dir(NAME) == NAME  # the relative folder, not the cached snapshot
    assert resolve_hf_dir(str(tiny_model_dir)) == str(tiny_model_dir)


def test_a_cached_hub_name_resolves_offline(hub, tiny_model_dir):
    from transformers import AutoTokenizer

    snapshot = add_to_hub_cache(hub, NAME, tiny_model_dir)
    assert os.path.samefile(resolve_hf_dir(NAME), snapshot)
    assert os.path.samefile(resolve_hf_dir(NAME, files="tokenizer"), snapshot)
    assert AutoTokenizer.from_pretrained(resolve_hf_dir(NAME, files="tokenizer")).chat_template


def test_a_cache_holding_only_the_tokenizer_serves_a_tokenizer_not_a_model(hub, tiny_model_dir):
    add_to_hub_cache(hub, NAME, tiny_model_dir, only={"tokenizer.json", "tokenizer_config.json"})
    assert resolve_hf_dir(NAME, files="tokenizer")
    with pytest.raises(HubError, match="holds an incomplete snapshot of it .*config.json, \\*.safetensors"):
        resolve_hf_dir(NAME)


def test_neither_folder_nor_cached_offline_names_both_fixes(hub):
    with pytest.raises(HubError) as err:
        resolve_hf_dir("some-org/not-cached")
    text = str(err.value)
    assert "some-org/not-cached: not a local folder, and the Hugging Face cache" in text
    assert str(hub) in text and "has no snapshot of it" in text
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in text and "HF_HOME/HF_HUB_CACHE" in text


def test_neither_folder_nor_cached_with_the_hub_unreachable(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubError) as err:
        resolve_hf_dir("some-org/not-cached", files="tokenizer")
    text = str(err.value)
    assert "has no snapshot of it, and downloading it failed" in text and "Connection refused" in text
    assert "pass a local folder" in text and "HF_HOME/HF_HUB_CACHE" in text


@pytest.mark.parametrize("name", ["/no/such/model/dir", "./missing", "ckpt/a/b"])
def test_a_missing_path_that_is_no_hub_name(hub, name):
    with pytest.raises(HubError, match="is not a local folder \\(no such directory\\) and not a valid Hugging Face"):
        resolve_hf_dir(name)
