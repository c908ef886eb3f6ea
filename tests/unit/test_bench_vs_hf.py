"""benchmarks/bench_vs_hf.py on CPU: the HF peers' masks, labels and loss, and the report writer.

A tiny random Llama (fp32) and two packs built by hand. On CPU flex_attention runs forward only
(no backward), so the BlockMask is checked with flex forward and training uses the same mask_mod
as a dense SDPA mask; both must isolate conversations exactly, the one-sequence SDPA path must not.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

from megatron_sft.config import ModelConfig

BENCH_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, os.path.abspath(BENCH_DIR))  # bench_vs_hf imports its sibling make_synthetic_chats


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("bench_vs_hf")
chats = _load("make_synthetic_chats")

SEQ = 48
FP32_FLEX = dict(attention="flex", dtype=torch.float32, amp=False, lean=False)
FP32_CAUSAL = dict(attention="causal", dtype=torch.float32, amp=False, lean=False)


def _pack(lengths, seed):
    """A pack like PackedDataset gives: every other token of each conversation supervised."""
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    loss_mask = np.zeros(n, np.uint8)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    for start, end in zip(cu[:-1], cu[1:]):
        loss_mask[start + (end - start) // 2:end] = 1  # the second half of each conversation is "assistant"
    return {"tokens": rng.integers(3, 97, n).astype(np.int32), "loss_mask": loss_mask, "cu_seqlens": cu}


@pytest.fixture(scope="module")
def model_cfg():
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                       vocab_size=97, max_position_embeddings=128, rotary_base=10000.0)


@pytest.fixture(scope="module")
def model(model_cfg):
    bench.register_flex_eager()
    return bench.build_model(model_cfg, FP32_FLEX, "cpu", seed=0)


def test_pack_arrays_worked_example():
    pack = {"tokens": np.array([10, 11, 12, 20, 21]), "loss_mask": np.array([0, 1, 1, 0, 1]),
            "cu_seqlens": np.array([0, 3, 5])}
    flex = bench.pack_arrays(pack, 6, "flex")
    assert flex["doc_ids"].tolist() == [0, 0, 0, 1, 1, 2]  # the pad tail is a document of its own
    assert flex["position_ids"].tolist() == [0, 1, 2, 0, 1, 0]
    assert flex["input_ids"].tolist() == [10, 11, 12, 20, 21, 0]
    assert flex["target_index"].tolist() == [0, 1, 3] and flex["target_ids"].tolist() == [11, 12, 21]
    assert bench.pack_arrays(pack, 6, "causal")["position_ids"].tolist() == [0, 1, 2, 3, 4, 5]


def test_flex_block_mask_isolates(model):
    """Conversation 2 inside the pack (flex forward, BlockMask) == alone, in fp32."""
    diff = bench.isolation_diff(model, _pack([11, 17, 9], seed=1), SEQ, FP32_FLEX, "cpu")
    assert diff is not None and diff < 1e-5


def test_dense_training_mask_isolates(model):
    """The CPU training path (the same mask_mod, dense, SDPA) isolates too."""
    pack = _pack([11, 17, 9], seed=1)
    alone = {k: pack[k][11:28] for k in ("tokens", "loss_mask")} | {"cu_seqlens": np.array([0, 17])}
    logits = []
    for p in (pack, alone):
        batch = bench.to_device(bench.pack_arrays(p, SEQ, "flex"), "dense", "cpu")
        with torch.no_grad():
            logits.append(model(input_ids=batch["input_ids"][None], position_ids=batch["position_ids"][None],
                                attention_mask=batch["mask"], use_cache=False).logits[0])
    assert (logits[0][11:28] - logits[1][:17]).abs().max() < 1e-5


def test_one_causal_sequence_leaks(model):
    diff = bench.isolation_diff(model, _pack([11, 17, 9], seed=1), SEQ, FP32_CAUSAL, "cpu")
    assert diff > 1e-2
    assert bench.isolation_diff(model, _pack([40], seed=1), SEQ, FP32_CAUSAL, "cpu") is None  # one conversation


def _hand_loss(model, packs):
    """sum over supervised targets of -log p(target) / targets, each conversation run alone (plain causal)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for pack in packs:
            cu = pack["cu_seqlens"]
            for start, end in zip(cu[:-1], cu[1:]):
                tokens = torch.as_tensor(pack["tokens"][start:end], dtype=torch.long)
                logp = torch.log_softmax(model(input_ids=tokens[None], use_cache=False).logits[0].double(), -1)
                for j in range(end - start - 1):
                    if pack["loss_mask"][start + j + 1]:
                        total -= float(logp[j, tokens[j + 1]])
                        count += 1
    return total / count


def test_step_loss_is_sum_ce_over_targets(model):
    packs = [_pack([11, 17, 9], seed=2), _pack([30, 14], seed=3)]
    trained = copy.deepcopy(model)
    expected = _hand_loss(model, packs)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    loss = bench.hf_step(trained, optimizer, None, packs, FP32_FLEX, SEQ, clip_grad=1.0, device="cpu")
    assert loss == pytest.approx(expected, rel=1e-5)
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), trained.parameters())]
    assert all(changed)


def test_optimizer_groups_follow_megatron(model):
    """No weight decay on 1-D params; the trainer's schedule drives lr and weight decay."""
    from megatron_sft.config import load_config
    from megatron_sft.training.optimizer import build_scheduler

    cfg = load_config(os.path.join(BENCH_DIR, "..", "yaml_configs", "llama3.2_1b_16k.yaml"), [], has_cuda=True)
    optimizer = bench.make_optimizer(copy.deepcopy(model), cfg.training, "cpu")
    scheduler = build_scheduler(cfg, optimizer)
    scheduler.step(1)
    decay, no_decay = optimizer.param_groups
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == pytest.approx(2e-5 / 5) and optimizer.defaults["betas"] == (0.9, 0.95)


def test_llama_config_matches_yaml_shape():
    from megatron_sft.config import load_config

    cfg = load_config(os.path.join(BENCH_DIR, "..", "yaml_configs", "llama3.2_1b_16k.yaml"), [], has_cuda=True)
    hf = bench.llama_config(cfg.model)
    assert (hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size, hf.num_attention_heads,
            hf.num_key_value_heads, hf.head_dim, hf.vocab_size) == (16, 2048, 8192, 32, 8, 64, 128256)
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["factor"] == 32.0
    assert hf.rope_parameters["rope_theta"] == 500000.0 and hf.tie_word_embeddings is False


def _raw(times, status="ok", **extra):
    return {"status": status, "step_times_s": times, "losses": [10.0, 9.0, 8.0], **extra}


def test_report_rows_and_ratio(tmp_path):
    stats = [{"tokens": 1000, "targets": 400, "flops": 2e12}] * 3
    rows = [
        bench.summarize("ours", "ours", _raw([5.0, 1.0, 1.0], attention="THD"), stats, 1, 800.0),
        bench.summarize("hf_flex_bf16", "hf", _raw([9.0, 2.0, 2.0], isolation_max_abs_diff=0.01), stats, 1, 800.0),
        bench.summarize("hf_flex_amp", "hf", {"status": "OOM", "error": "Tried to allocate 9 GiB"}, stats, 1, 800.0),
        bench.summarize("hf_sdpa_leaks", "hf", _raw([9.0, 0.5, 0.5], isolation_max_abs_diff=3.2), stats, 1, 800.0),
    ]
    data = {"prefix": "p", "packs": 3, "conversations": 9, "real_tokens": 3000, "fill": 0.98, "benchmark_packs": 3,
            "benchmark_conversations": 9, "benchmark_conversation_tokens_median": 300.0,
            "benchmark_conversation_tokens_max": 500, "supervised_fraction": 0.4}
    result = {"command": "bench", "date": "today", "env": {"gpu": "H200"}, "seq_length": 1024, "steps": 3, "warmup": 1,
              "global_batch": 1, "data": data, "gemm": {"status": "ok", "ceiling_tflops": 800.0}, "rows": rows}
    json_path, md_path, markdown = bench.write_outputs(result, str(tmp_path), "t")
    ours = rows[0]
    assert ours["step_time_s"] == 1.0 and ours["tokens_per_s"] == 1000.0 and ours["tflops"] == pytest.approx(2.0)
    assert ours["mfu"] == pytest.approx(2.0 / 989) and ours["mfu_gemm"] == pytest.approx(2.0 / 800)
    assert ours["vs_best_hf_flex"] == pytest.approx(2.0)  # the faster SDPA row leaks: it is not "correct"
    assert all(r["vs_best_hf_flex"] is None for r in rows[1:])
    saved = json.loads(open(json_path).read())
    assert [r["system"] for r in saved["rows"]] == ["ours", "hf_flex_bf16", "hf_flex_amp", "hf_sdpa_leaks"]
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0][2:] for line in table] == ["ours", "hf_flex_bf16", "hf_flex_amp", "hf_sdpa_leaks"]
    assert "2.00x" in table[0] and "| OOM |" in table[2] and "Tried to allocate 9 GiB" in markdown
    assert "tokens/s vs best HF flex" in markdown and open(md_path).read() == markdown


def test_long_records_hit_word_target():
    rng = random.Random(0)
    for _ in range(5):
        record = chats.make_long_record(rng, 3000, 3500, 40)
        body = record["messages"][1:]
        assert 3000 <= sum(len(m["content"].split()) for m in body) <= 3500
        assert 40 <= len(body) <= 80 and [m["role"] for m in body[:2]] == ["user", "assistant"]
