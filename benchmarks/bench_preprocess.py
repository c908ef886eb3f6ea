#!/usr/bin/env python
"""Preprocessing throughput: plain ``apply_chat_template`` + tokenize vs the full compiler, and
the compiler's scaling with ``--workers``.

    python benchmarks/bench_preprocess.py [--tokenizer DIR] [--repeat N] [--seq-length N]
    python benchmarks/bench_preprocess.py --workers 1,2,4,8,16 [--data short|fixtures] [--tokens N]

Without ``--workers``, prints tokens/s per core (one process) for
  1. plain: ``tokenizer.apply_chat_template(messages, tools=..., tokenize=True)`` per record;
  2. masker: ``ChatMasker.encode`` (render, tokenize, spans, verification);
  3. compiler: ``compile_dataset`` with one worker (read + normalise + encode + pack + write);
and ChatMasker tokens/s on synthetic conversations of 2 vs 32 turns (equal tokens/s means time
grows linearly with the conversation). Uses the real fixtures (qwen2.5-instruct tokenizer and
the datasets in ../shared/fixtures) when present, otherwise the tiny tokenizer and synthetic data.
Targets: compiler >= 150K tokens/s per core and <= 2x the plain time.

With ``--workers`` (a sweep), runs ``tools/preprocess_data.py`` once per worker count, each in a
fresh process (start-up included, as a user runs it), on ``--tokens`` tokens of short synthetic
chats (``short``, ~110 tokens each) or of the fixture records repeated (``fixtures``, ~650 each),
and prints wall time, tokens/s, speedup, the report's stage timings and a prediction for the
other counts from the first one's costs (see benchmarks/results/preprocess_scaling.md).
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
        from megatron_sft.testing.tiny_tokenizer import build_tiny_tokenizer

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
    parser.add_argument("--workers", help="sweep: comma-separated worker counts, e.g. 1,2,4,8,16")
    parser.add_argument("--data", choices=["short", "fixtures"], default="short", help="sweep: input records")
    parser.add_argument("--tokens", type=float, default=5.4e6, help="sweep: tokens of input to generate")
    parser.add_argument("--json", help="sweep: also write the rows (with each run's report) to this file")
    args = parser.parse_args()
    if args.workers:
        sweep(args)
    else:
        bench_one_core(args)


def bench_one_core(args) -> None:
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
                               seq_length=args.seq_length, on_error="skip", overlength="truncate", progress=False,
                               overwrite=True)
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


# ---------------------------------------------------------------- --workers sweep

SHORT_WORDS = ("the model answers each question with care and cites the tool output when it is useful data "
               "packing attention tokens sequence parallel gradient loss batch python function value result "
               "error retry plan step first then finally because therefore example").split()


def short_chats(num_records: int, seed: int = 0) -> list[dict]:
    """Short chats: 1-2 user/assistant pairs of 5-30 / 10-60 words, half with a system prompt
    (~110 tokens each with the Qwen2.5 tokenizer)."""
    import random

    rng = random.Random(seed)
    records = []
    for _ in range(num_records):
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 2)):
            messages.append({"role": "user", "content": " ".join(rng.choices(SHORT_WORDS, k=rng.randint(5, 30))) + "?"})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(SHORT_WORDS, k=rng.randint(10, 60))) + "."})
        records.append({"messages": messages})
    return records


def _sweep_input(tmp: str, data: str, tokens: float, tokenizer_dir: str) -> tuple[str, int]:
    """A JSONL file of about ``tokens`` tokens; returns (path, number of records)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if data == "short":
        sample = short_chats(400, seed=1)
    else:
        _, paths = _inputs(tmp, tokenizer_dir, 1)
        sample = [json.loads(line) for line in open(paths[0], encoding="utf-8")]
    conversations = _conversations_from_payloads(sample)
    per_record = sum(len(tokenizer.apply_chat_template(c.messages, tools=c.tools, tokenize=True, return_dict=False))
                     for c in conversations) / len(sample)
    num_records = int(tokens / per_record) + 1
    records = short_chats(num_records) if data == "short" else (sample * (num_records // len(sample) + 1))[:num_records]
    path = os.path.join(tmp, f"sweep_{data}.jsonl")
    _write_jsonl(records, path)
    return path, num_records


def _conversations_from_payloads(payloads: list[dict]):
    from megatron_sft.data.formats import RecordError, normalize_record

    out = []
    for payload in payloads:
        try:
            out.append(normalize_record(payload))
        except RecordError:
            pass
    return out


def _run_cli(tokenizer_dir: str, path: str, prefix: str, workers: int, seq_length: int) -> tuple[float, dict]:
    """One ``tools/preprocess_data.py`` run in a fresh process: (wall seconds, its report)."""
    import subprocess

    command = [sys.executable, os.path.join(REPO_ROOT, "tools", "preprocess_data.py"), "--input", path,
               "--tokenizer", tokenizer_dir, "--output-prefix", prefix, "--seq-length", str(seq_length),
               "--workers", str(workers), "--on-error", "skip", "--overlength", "truncate", "--no-progress",
               "--overwrite"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"preprocess_data.py --workers {workers} failed:\n{done.stderr[-3000:]}")
    with open(prefix + ".report.json", encoding="utf-8") as f:
        return wall, json.load(f)


def predict(base: dict, multi: dict | None, workers: int) -> float:
    """Predicted wall seconds with ``workers`` workers, each on its own core plus one core for the
    parent, from a 1-worker run's costs (``base``) and a multi-worker run's fixed start-up
    (``multi``): fixed + max(worker start-up + encoding / workers, parent's own stage-1 work,
    Megatron-Core import) + pack and write."""
    t1 = base["report"]["timing_s"]
    encode_cpu = t1["workers_cpu_s"]  # in-process: the encoders' time (parse, normalise, mask, spill)
    source = multi if workers > 1 and multi is not None else base
    t = source["report"]["timing_s"]
    # The parent's own stage-1 work (reading, sampling, tallying, and with workers the task
    # traffic) hardly depends on the number of workers: take it from the run that has it.
    parent_s = t["parent_cpu_s"] if source is multi else max(t1["parent_cpu_s"] - encode_cpu, 0.0)
    fixed = source["wall_s"] - t["encode_s"] - t["pack_write_s"] - t["import_wait_s"]
    stage1 = max(t["worker_startup_s"] + encode_cpu / workers, parent_s, t1["import_cpu_s"])
    return fixed + stage1 + t1["pack_write_s"]


def sweep(args) -> None:
    counts = [int(w) for w in args.workers.split(",")]
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir, _ = _inputs(tmp, args.tokenizer, 1)
        path, num_records = _sweep_input(tmp, args.data, args.tokens, tokenizer_dir)
        print(f"{os.cpu_count()} CPUs; tokenizer {tokenizer_dir}; {num_records} {args.data} records in {path}")
        print(f"{'workers':>7} {'wall s':>7} {'tok/s':>8} {'speedup':>7} {'startup':>7} {'encode':>7} "
              f"{'parent%':>7} {'wkr util%':>9} {'wkr start':>9} {'pack+wr':>7}")
        rows = []
        for workers in counts:
            wall, report = _run_cli(tokenizer_dir, path, os.path.join(tmp, f"w{workers}", "sft"), workers, args.seq_length)
            rows.append({"workers": workers, "wall_s": wall, "report": report})
            t = report["timing_s"]
            print(f"{workers:7d} {wall:7.2f} {report['encoded_tokens'] / wall / 1e3:7.0f}K {rows[0]['wall_s'] / wall:7.2f} "
                  f"{wall - t['encode_s'] - t['pack_write_s']:7.2f} {t['encode_s']:7.2f} "
                  f"{100 * t['parent_cpu_s'] / t['encode_s']:7.0f} "
                  f"{100 * t['workers_cpu_s'] / (workers * t['encode_s']):9.0f} {t['worker_startup_s']:9.2f} "
                  f"{t['pack_write_s']:7.2f}", flush=True)
        _print_prediction(rows, counts)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(rows, f, indent=2)


def _print_prediction(rows: list[dict], counts: list[int]) -> None:
    base = next((r for r in rows if r["workers"] == 1), None)
    if base is None:
        return
    multi = next((r for r in rows if r["workers"] > 1), None)
    tokens = base["report"]["encoded_tokens"]
    print("prediction from the 1-worker run's costs (one core per worker plus one for the parent):")
    for workers in sorted(set(counts) | {16}):
        seconds = predict(base, multi, workers)
        measured = next((r["wall_s"] for r in rows if r["workers"] == workers), None)
        seen = f", measured {tokens / measured / 1e3:.0f}K" if measured else ""
        print(f"  {workers:3d} workers: {seconds:6.2f} s, {tokens / seconds / 1e3:7.0f}K tokens/s{seen}")


if __name__ == "__main__":
    main()
