"""Sharded preprocessing (--num-shards N --shard-index i): each shard holds the conversations whose
first record_index % N == i, with global provenance; the shards together hold exactly the unsharded
run's conversations, and their merged report's counts equal its report's."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from megatron_sft.data import PackedDataset
from megatron_sft.data.compiler import CompileConfig, compile_dataset
from megatron_sft.data.reports import merge_reports, read_shard_reports, shard_prefix

WORDS = ["fox", "dog", "Paris", "brown", "lazy", "jumps"]


def _records(count: int, seed: int) -> list[str]:
    lines = []
    for i in range(count):
        answer = " ".join(WORDS[(i * 7 + j + seed) % len(WORDS)] for j in range(1 + (i * 13 + seed) % 30))
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"question {seed}.{i}"},
                                              {"role": "assistant", "content": answer}]}))
    return lines


@pytest.fixture
def inputs(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    bad = ["{broken", json.dumps({"text": "no messages"}), json.dumps({"messages": [{"role": "user", "content": "q"}]})]
    long = json.dumps({"messages": [{"role": "user", "content": "long"},
                                    {"role": "assistant", "content": "fox jumps " * 200}]})
    a.write_text("\n".join(_records(40, 1)[:20] + bad + [long] + _records(40, 1)[20:]) + "\n")
    b.write_text("\n".join(_records(31, 2)) + "\n")  # 31: shards of unequal size
    return [str(a), str(b)]


def _config(tmp_path, tokenizer_dir, inputs, prefix, **overrides):
    values = dict(inputs=inputs, tokenizer=str(tokenizer_dir), output_prefix=str(tmp_path / prefix), seq_length=256,
                  on_error="skip", progress=False, seed=3, mixture_ratios=[2.0, 0.5])
    values.update(overrides)
    return CompileConfig(**values)


def _conversations(prefix) -> Counter:
    """Multiset of (source, record, tokens, loss mask) over every conversation of a file set."""
    found = Counter()
    dataset = PackedDataset(prefix)
    for i in range(len(dataset)):
        pack = dataset[i]
        cu = pack["cu_seqlens"]
        for j, (source, record) in enumerate(zip(pack["source_index"].tolist(), pack["record_index"].tolist())):
            found[(source, record, pack["tokens"][cu[j]:cu[j + 1]].tobytes(),
                   pack["loss_mask"][cu[j]:cu[j + 1]].tobytes())] += 1
    return found


def _counts(report: dict) -> dict:
    """Everything in a report that is additive over shards."""
    keys = ("records_read", "records_used", "records_kept", "records_dropped", "truncated", "conversations",
            "real_tokens", "encoded_tokens", "supervised_tokens", "pseudo_multiturn")
    per_source = ("path", "ratio", "records_read", "records_used", "records_kept", "records_dropped", "conversations",
                  "real_tokens", "supervised_tokens", "token_share")
    return {**{k: report[k] for k in keys},
            "dropped": {reason: entry["records"] for reason, entry in report["dropped"].items()},
            "reasoning": (report["reasoning_not_rendered"]["records"], report["reasoning_not_rendered"]["turns"]),
            "mixture": [{k: m[k] for k in per_source} for m in report["mixture"]]}


@pytest.mark.parametrize("num_shards, merge_turns", [(3, False), (2, True)])
def test_shards_partition_the_unsharded_run(tmp_path, tiny_tokenizer_dir, inputs, num_shards, merge_turns):
    extra = dict(pseudo_multiturn_prob=1.0, pseudo_multiturn_max_turns=3) if merge_turns else {}
    whole = compile_dataset(_config(tmp_path, tiny_tokenizer_dir, inputs, "whole", **extra))
    assert set(whole["dropped"]) == {"invalid_json", "unrecognized_format", "no_assistant_turn", "too_long"}
    union = Counter()
    for shard in range(num_shards):
        config = _config(tmp_path, tiny_tokenizer_dir, inputs, "sharded", num_shards=num_shards, shard_index=shard,
                         workers=2 if shard == 0 else 1, **extra)
        report = compile_dataset(config)
        assert report["output_prefix"] == shard_prefix(str(tmp_path / "sharded"), shard)
        assert report["shard"] == {"index": shard, "count": num_shards}
        assert report["records_read"] == len(range(shard, 44 + 31, num_shards))  # a.jsonl 44 records, b.jsonl 31
        if not merge_turns:  # each of the shard's used records is kept or dropped here
            assert report["records_used"] == report["records_kept"] + report["records_dropped"]
        found = _conversations(report["output_prefix"])
        assert found and all(record % num_shards == shard for _, record, _, _ in found)
        assert PackedDataset(report["output_prefix"]).meta["shard"] == {"index": shard, "count": num_shards}
        union += found
    assert union == _conversations(tmp_path / "whole")
    merged = merge_reports(read_shard_reports(str(tmp_path / "sharded")))
    assert _counts(merged) == _counts(whole)
    assert merged["train_prefix"] == [shard_prefix(str(tmp_path / "sharded"), i) for i in range(num_shards)]
    assert merged["output_prefix"] == str(tmp_path / "sharded")
    assert merged["fill_ratio"] == round(merged["real_tokens"] / (merged["packs"] * 256), 6)


def test_merge_refuses_what_is_not_one_run(tmp_path, tiny_tokenizer_dir, inputs):
    with pytest.raises(ValueError, match=r"sft_shard0.report.json not found: is .* the --output-prefix of a sharded run"):
        read_shard_reports(str(tmp_path / "sft"))
    for shard in (0, 2):
        compile_dataset(_config(tmp_path, tiny_tokenizer_dir, inputs, "sft", num_shards=3, shard_index=shard))
    with pytest.raises(ValueError, match=r"1 of 3 shard reports missing .*: .*sft_shard1.report.json$"):
        read_shard_reports(str(tmp_path / "sft"))
    compile_dataset(_config(tmp_path, tiny_tokenizer_dir, inputs, "sft", num_shards=3, shard_index=1, seq_length=512))
    with pytest.raises(ValueError, match=r"not the shards of one run:\n  .*sft_shard1: seq_length 512 differs"):
        merge_reports(read_shard_reports(str(tmp_path / "sft")))
    reports = read_shard_reports(str(tmp_path / "sft"))
    with pytest.raises(ValueError, match=r"sft_shard2: is shard 2 of 3, expected shard 1 of 2"):
        merge_reports([reports[0], reports[2]])
    unsharded = compile_dataset(_config(tmp_path, tiny_tokenizer_dir, inputs, "plain_shard0"))
    assert unsharded["shard"] is None
    with pytest.raises(ValueError, match=r"plain_shard0.report.json is not the report of a shard"):
        read_shard_reports(str(tmp_path / "plain"))


def test_invalid_shard_settings(tmp_path, tiny_tokenizer_dir, inputs):
    for shards, index in ((2, 2), (0, 0), (3, -1)):
        with pytest.raises(ValueError, match=rf"--shard-index must be in 0..--num-shards-1, got shard {index} of {shards}"):
            compile_dataset(_config(tmp_path, tiny_tokenizer_dir, inputs, "x", num_shards=shards, shard_index=index))
