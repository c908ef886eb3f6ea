"""tools/launch/preprocess_array.sbatch run the way SLURM runs each array task (bash, with
SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT set), then tools/merge_reports.py: the shards hold the
unsharded run's conversations and the merged report its counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from megatron_sft.data import PackedDataset
from megatron_sft.data.compiler import CompileConfig, compile_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "tools" / "launch" / "preprocess_array.sbatch"


def _task(shard: int, count: int, *args, **env):
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(shard), "SLURM_ARRAY_TASK_COUNT": str(count),
           "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "1", "SLURM_CPUS_PER_TASK": "1", **env}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=env, timeout=300)


def _conversations(prefix) -> Counter:
    found, dataset = Counter(), PackedDataset(prefix)
    for i in range(len(dataset)):
        pack = dataset[i]
        cu = pack["cu_seqlens"]
        for j, record in enumerate(pack["record_index"].tolist()):
            found[(record, pack["tokens"][cu[j]:cu[j + 1]].tobytes(), pack["loss_mask"][cu[j]:cu[j + 1]].tobytes())] += 1
    return found


def test_array_tasks_then_merge(tmp_path, tiny_tokenizer_dir):
    data = tmp_path / "chats.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                      {"role": "assistant", "content": "fox " * (1 + i % 17)}]}) for i in range(41)]
    data.write_text("\n".join(lines[:20] + ["{not json"] + lines[20:]) + "\n")
    common = ["--input", data, "--tokenizer", tiny_tokenizer_dir, "--seq-length", 128, "--on-error", "skip"]
    for shard in range(2):
        done = _task(shard, 2, *common, "--output-prefix", tmp_path / "sft")
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"sft-preprocess: shard {shard} of 2, 1 workers" in done.stdout
        assert f"wrote {tmp_path / 'sft'}_shard{shard}_{{tokens" in done.stdout
    merged = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "merge_reports.py"), str(tmp_path / "sft")],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert merged.returncode == 0, merged.stderr
    assert f"--data.train_prefix=[{tmp_path / 'sft'}_shard0,{tmp_path / 'sft'}_shard1]" in merged.stdout

    whole = compile_dataset(CompileConfig(inputs=[str(data)], tokenizer=str(tiny_tokenizer_dir), seq_length=128,
                                          output_prefix=str(tmp_path / "whole"), on_error="skip", progress=False))
    report = json.loads((tmp_path / "sft.report.json").read_text())
    for key in ("records_read", "records_kept", "records_dropped", "conversations", "real_tokens", "supervised_tokens"):
        assert report[key] == whole[key], key
    assert report["dropped"]["invalid_json"]["records"] == 1 and whole["records_read"] == 42
    assert _conversations(tmp_path / "sft_shard0") + _conversations(tmp_path / "sft_shard1") == _conversations(tmp_path / "whole")


def test_array_task_refusals(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    outside = subprocess.run(["bash", str(SCRIPT), "--input", "x"], capture_output=True, text=True, env=env, timeout=60)
    assert outside.returncode != 0 and "submit with sbatch --array=0-<N-1>" in outside.stderr
    given = _task(0, 2, "--input", "x", "--shard-index", "1")
    assert given.returncode == 2 and "--shard-index is set from the array (task 0 of 2); drop it" in given.stderr
    offset = _task(1, 2, "--input", "x", SLURM_ARRAY_TASK_MIN="1")
    assert offset.returncode == 2 and "the array must be 0..N-1 with step 1" in offset.stderr
