#!/usr/bin/env python
"""Preprocessing throughput: plain ``apply_chat_template`` + tokenize vs the full compiler.

    python benchmarks/bench_preprocess.py [--tokenizer DIR] [--repeat N] [--seq-length N]

Prints tokens/s per core (one process) for
  1. plain: ``tokenizer.apply_chat_template(messages, tools=..., tokenize=True)`` per record;
  2. masker: ``ChatMasker.encode`` (render, tokenize, spans, verification);
  3. compiler: ``compile_dataset`` with one worker (read + normalise + encode + pack + write);
and ChatMasker tokens/s on synthetic conversations of 2 vs 32 turns (equal tokens/s means time
grows linearly with the conversation). Uses the real fixtures (qwen2.5-instruct tokenizer and
the datasets in ../shared/fixtures) when present, otherwise the tiny tokenizer and synthetic data.
Targets: compiler >= 150K tokens/s per core and <= 2x the plain time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
FIXTURES = os.environ.get("MEGATRON_SFT_FIXTURES", os.path.join(os.path.dirname(REPO_ROOT), "shared", "fixtures"))
FIXTURE_DATASETS = [
    "llamafactory_glaive_toolcall_en_demo.json",
    "llamafactory_reason_tool_use_demo_50.jsonl",
    "openai_cookbook_toy_chat_fine_tuning.jsonl",
    "axolotl_conversation.json",
]


def _synthetic(num_turns: int, num_records: int) -> list[dict]:
    records = []
    for r in range(num_records):
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for t in range(num_turns // 2):
            messages.append({"role": "user", "content": f"Question {r}.{t}: what is {t} + {r}? Please explain step by step."})
            messages.append({"role": "assistant", "content": f"Let me think. {t} + {r} = {t + r}. " * 8})
        records.append({"messages": messages})
    return records


def _write_jsonl(records: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _inputs(tmp: str, tokenizer_arg: str | None, repeat: int) -> tuple[str, list[str]]:
    """(tokenizer dir, input files); the inputs are the fixtures repeated, or synthetic."""
    qwen = os.path.join(FIXTURES, "tokenizers", "qwen2.5-instruct")
    datasets_dir = os.path.join(FIXTURES, "datasets")
    if tokenizer_arg is None and os.path.isdir(qwen):
        tokenizer_arg = qwen
    if tokenizer_arg is None:
        from megatron_sft.data.tiny_tokenizer import build_tiny_tokenizer

        tokenizer_arg = os.path.join(tmp, "tiny_tokenizer")
        build_tiny_tokenizer(tokenizer_arg)
    if os.path.isdir(datasets_dir):
        from megatron_sft.data.formats import iter_records

        rows = [r.payload for r in iter_records([os.path.join(datasets_dir, d) for d in FIXTURE_DATASETS]) if r.payload]
        records = rows * repeat
    else:
        records = _synthetic(8, 200 * repeat)
    path = os.path.join(tmp, "bench.jsonl")
    _write_jsonl(records, path)
    return tokenizer_arg, [path]


def _conversations(paths: list[str]):
    from megatron_sft.data.formats import RecordError, iter_records, normalize_record

    out = []
    for record in iter_records(paths):
        try:
            out.append(normalize_record(record.payload))
        except (RecordError, TypeError):
            pass
    return out


def bench_plain(tokenizer, conversations) -> tuple[int, float]:
    tokens, start = 0, time.perf_counter()
    for c in conversations:
        try:
            ids = tokenizer.apply_chat_template(c.messages, tools=c.tools, tokenize=True, return_dict=False)
        except Exception:
            continue
        tokens += len(ids)
    return tokens, time.perf_counter() - start


def bench_masker(masker, conversations) -> tuple[int, float]:
    from megatron_sft.data.chat_masks import MaskError

    tokens, start = 0, time.perf_counter()
    for c in conversations:
        try:
            tokens += len(masker.encode(c.messages, tools=c.tools).input_ids)
        except MaskError:
            continue
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="tokenizer dir (default: qwen2.5 fixture, else the tiny one)")
    parser.add_argument("--repeat", type=int, default=3, help="times the fixture records are repeated")
    parser.add_argument("--seq-length", type=int, default=16384)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from transformers import AutoTokenizer

    from megatron_sft.data.chat_masks import ChatMasker
    from megatron_sft.data.compiler import CompileConfig, compile_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir, inputs = _inputs(tmp, args.tokenizer, args.repeat)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        conversations = _conversations(inputs)
        masker = ChatMasker(tokenizer)
        print(f"tokenizer {tokenizer_dir}; {len(conversations)} conversations from {inputs[0]}")
        plain_tokens, plain_s = bench_plain(tokenizer, conversations)
        masked_tokens, masked_s = bench_masker(masker, conversations)
        config = CompileConfig(inputs=inputs, tokenizer=tokenizer_dir, output_prefix=os.path.join(tmp, "out", "bench"),
                               seq_length=args.seq_length, on_error="skip", overlength="truncate", progress=False)
        import megatron_sft.data.indexed  # noqa: F401  (one-time Megatron import, outside the timing)

        # Fixed cost of a run (tokenizer load, counting, temp files): a one-record run.
        start = time.perf_counter()
        compile_dataset(dataclasses.replace(config, limit=1))
        startup_s = time.perf_counter() - start
        start = time.perf_counter()
        report = compile_dataset(config)
        compile_s = time.perf_counter() - start
        compile_tokens = report["encoded_tokens"]
        rows = [("plain apply_chat_template+tokenize", plain_tokens, plain_s),
                ("ChatMasker.encode", masked_tokens, masked_s),
                ("compiler end to end (1 worker)", compile_tokens, compile_s),
                ("compiler minus fixed startup", compile_tokens, compile_s - startup_s)]
        print(f"fixed startup of a run (tokenizer load etc.): {startup_s:.2f} s")
        for name, tokens, seconds in rows:
            print(f"{name:42s} {tokens:>10d} tokens {seconds:8.2f} s {tokens / seconds / 1e3:9.1f}K tokens/s/core")
        per_token = lambda tokens, seconds: seconds / max(tokens, 1)  # noqa: E731
        print(f"compiler / plain time per token: {per_token(compile_tokens, compile_s) / per_token(plain_tokens, plain_s):.2f}x "
              f"end to end, {per_token(compile_tokens, compile_s - startup_s) / per_token(plain_tokens, plain_s):.2f}x without startup "
              f"(masker alone {per_token(masked_tokens, masked_s) / per_token(plain_tokens, plain_s):.2f}x); "
              f"fill ratio {report['fill_ratio']:.4f}, {report['records_dropped']} records dropped")
        for turns in (2, 32):
            synthetic = _conversations_from(_synthetic(turns, max(4, 320 // turns)))
            t_tokens, t_s = bench_masker(masker, synthetic)
            p_tokens, p_s = bench_plain(tokenizer, synthetic)
            print(f"{turns:2d} turns: masker {t_tokens / t_s / 1e3:8.1f}K tokens/s, plain {p_tokens / p_s / 1e3:8.1f}K tokens/s "
                  f"({t_tokens // len(synthetic)} tokens/conversation)")


def _conversations_from(records: list[dict]):
    from megatron_sft.data.formats import normalize_record

    return [normalize_record(r) for r in records]


if __name__ == "__main__":
    main()
