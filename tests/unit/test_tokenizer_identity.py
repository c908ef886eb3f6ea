"""Tokenizer identity in the meta (name + vocab hash) and the check that every prefix of a run
used the same tokenizer."""

from __future__ import annotations

import logging

import pytest

from megatron_sft.data.tokenizer_identity import HASH_KEY, check_same_tokenizer, vocab_sha256


def test_vocab_hash_depends_on_the_id_map_only(tiny_tokenizer_dir, tiny_tokenizer):
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert vocab_sha256(again) == vocab_sha256(tiny_tokenizer) and len(vocab_sha256(again)) == 64
    again.add_tokens(["<|new|>"])
    assert vocab_sha256(again) != vocab_sha256(tiny_tokenizer)


def _meta(name, size, digest):
    meta = {"tokenizer": name, "vocab_size": size}
    if digest is not None:
        meta[HASH_KEY] = digest
    return meta


def test_same_hash_from_different_folders_is_accepted():
    check_same_tokenizer({"a": _meta("/x/qwen", 10, "f" * 64), "b": _meta("Qwen/Qwen2.5", 10, "f" * 64)})


def test_different_tokenizers_listed_with_identities():
    metas = {"data/a": _meta("qwen", 10, "a" * 64), "data/b": _meta("llama", 12, "b" * 64)}
    with pytest.raises(ValueError) as info:
        check_same_tokenizer(metas)
    message = str(info.value)
    assert "data/a: qwen (vocab_size 10, vocab sha256 aaaaaaaaaaaa)" in message
    assert "data/b: llama (vocab_size 12, vocab sha256 bbbbbbbbbbbb)" in message
    assert "same --tokenizer" in message


def test_reference_tokenizer_compared_too():
    reference = ("checkpoint.pretrained tokenizer ckpt/tokenizer", _meta("ckpt/tokenizer", 10, "c" * 64))
    with pytest.raises(ValueError, match="checkpoint.pretrained tokenizer ckpt/tokenizer"):
        check_same_tokenizer({"data/a": _meta("qwen", 10, "a" * 64)}, reference)


def test_old_meta_without_hash_warns_and_compares_vocab_size(caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_sft"):
        check_same_tokenizer({"old": _meta("qwen", 10, None), "new": _meta("qwen", 10, "a" * 64)})
    assert "tokenizer identity not recorded in the meta of old" in caplog.text
    with pytest.raises(ValueError, match="vocab sha256 not recorded"):
        check_same_tokenizer({"old": _meta("qwen", 10, None), "new": _meta("llama", 12, "a" * 64)})
