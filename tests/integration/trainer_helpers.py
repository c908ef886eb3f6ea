"""Helpers of the trainer integration tests: synthetic packed datasets written with the real
writer (no tokenizer needed), a tiny config, and runs of pretrain_sft.py in subprocesses
(Megatron's CPU patches are process-global)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
VOCAB = 128


def conversations(num: int, seed: int, min_len: int = 12, max_len: int = 48) -> list:
    """``num`` (tokens, loss_mask) conversations: a prompt (mask 0) and a reply (mask 1) that is
    a deterministic function of the prompt, so a model can learn it."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        n = int(rng.integers(min_len, max_len + 1))
        prompt_len = n // 2
        prompt = rng.integers(3, VOCAB, prompt_len)
        reply = (prompt[::-1][: n - prompt_len] * 7 + 1) % (VOCAB - 3) + 3
        tokens = np.concatenate([[1], prompt, reply])[:n].astype(np.int32)
        mask = np.concatenate([np.zeros(prompt_len + 1), np.ones(n)])[:n].astype(np.uint8)
        out.append((tokens, mask))
    return out


def first_fit(lengths: Sequence[int], seq_length: int) -> List[List[int]]:
    """Conversations in order, a new pack whenever the next one does not fit."""
    packs, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > seq_length:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


def write_packed(prefix: Path, convs: list, seq_length: int, packs: Optional[List[List[int]]] = None,
                 sources: Optional[Sequence[int]] = None, input_names=("synthetic.jsonl",),
                 vocab_size: int = VOCAB) -> str:
    from megatron_sft.data.indexed import PackedWriter, meta_path

    prefix.parent.mkdir(parents=True, exist_ok=True)
    packs = packs if packs is not None else first_fit([len(t) for t, _ in convs], seq_length)
    sources = sources if sources is not None else [0] * len(convs)
    writer = PackedWriter(prefix)
    for pack in packs:
        writer.add_pack([convs[i][0] for i in pack], [convs[i][1] for i in pack],
                        [sources[i] for i in pack], list(pack))
    writer.finalize()
    meta = {"format_version": 1, "tokenizer": "synthetic", "vocab_size": vocab_size,
            "tokenizer_vocab_sha256": f"synthetic-{vocab_size}", "seq_length": seq_length,
            "chat_template_sha256": "0" * 64, "settings": {"inputs": list(input_names)},
            "counts": {"num_packs": writer.num_packs, "num_conversations": writer.num_conversations,
                       "num_tokens": writer.num_tokens}}
    Path(meta_path(prefix)).write_text(json.dumps(meta))
    return str(prefix)


TINY = {
    "model": {"num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
              "num_query_groups": 2, "vocab_size": VOCAB, "max_position_embeddings": 512,
              "attention_backend": "torch"},
    "data": {"seq_length": 256},
    "training": {"global_batch_size": 4, "micro_batch_size": 1, "train_steps": 4, "lr": 1e-3,
                 "lr_warmup_steps": 1, "clip_grad": 1.0},
    "logging": {"log_interval": 1, "tensorboard": False},
}


def write_config(path: Path, **sections) -> str:
    cfg = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config: str, *args: str, nproc: int = 1, timeout: int = 300, check: bool = True,
        env_extra: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run pretrain_sft.py (torchrun when nproc > 1) and return the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_PORT=str(free_port()),
               MASTER_ADDR="127.0.0.1", **(env_extra or {}))
    script = [str(REPO / "pretrain_sft.py"), "--config", config, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={env['MASTER_PORT']}", *script]
    else:
        cmd = [sys.executable, *script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def metrics(directory) -> List[dict]:
    path = Path(directory) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_records(directory) -> List[dict]:
    return [r for r in metrics(directory) if "loss" in r]
