"""Single-process trainer behaviour: resume is bit-exact, SIGTERM saves and exits 0, atomic
checkpoints, the model learns, --eval-only prints one line, and evaluation does not depend on
how conversations were packed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.integration.trainer_helpers import (REPO, conversations, free_port, metrics, run, train_records,
                                               write_config, write_packed)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    train = write_packed(root / "train", conversations(40, seed=0), seq_length=256)
    valid = write_packed(root / "valid", conversations(12, seed=1), seq_length=256)
    return root, train, valid


def test_six_steps_equal_three_save_resume_three(data, tmp_path):
    _, train, valid = data
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": train, "valid_prefix": valid},
                          training={"train_steps": 6, "eval_interval_steps": 3})
    run(config, f"--checkpoint.save={tmp_path / 'straight'}")
    run(config, f"--checkpoint.save={tmp_path / 'split'}", "--training.train_steps=3",
        "--training.lr_decay_steps=6")
    first_dir = tmp_path / "split" / "iter_0000003"
    assert (first_dir / "config.yaml").exists() and (first_dir / "data_meta.json").exists()
    run(config, f"--checkpoint.save={tmp_path / 'split'}", f"--checkpoint.load={tmp_path / 'split'}",
        "--training.lr_decay_steps=6")
    straight = [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in train_records(tmp_path / "straight")]
    split = [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in train_records(tmp_path / "split")]
    assert split == straight  # bit-equal on CPU
    evals = [r for r in metrics(tmp_path / "split") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert (tmp_path / "split" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    saved = json.loads((tmp_path / "split" / "iter_0000006" / "data_meta.json").read_text())
    assert saved["tokenizer"] == "synthetic"
    # A changed learning rate on resume takes effect from the resumed step (min_lr 0: lr scales),
    # with the saved optimizer moments.
    run(config, f"--checkpoint.save={tmp_path / 'half_lr'}", f"--checkpoint.load={first_dir}",
        "--training.lr_decay_steps=6", "--training.lr=5e-4")
    half = [(r["step"], r["lr"]) for r in train_records(tmp_path / "half_lr")]
    assert half == [(s, pytest.approx(lr / 2, rel=1e-9)) for s, _, _, lr in straight[3:]]


def test_metrics_records(data, tmp_path):
    _, train, _ = data
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": train}, training={"train_steps": 2})
    proc = run(config, f"--logging.dir={tmp_path / 'logs'}")
    records = train_records(tmp_path / "logs")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in ("loss", "grad_norm", "lr", "supervised_tokens", "tokens_per_s_per_gpu", "tflops_per_gpu",
                    "memory_gib", "loss/synthetic"):
            assert key in r, key
        assert r["supervised_tokens"] > 0 and np.isfinite(r["loss"])
    assert "resolved config" in proc.stderr and "step 2 | loss" in proc.stderr


def test_sigterm_finishes_the_step_saves_and_exits_zero(data, tmp_path):
    _, train, _ = data
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": train}, training={"train_steps": 100000},
                          checkpoint={"save": str(tmp_path / "ckpt")})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_PORT=str(free_port()))
    proc = subprocess.Popen([sys.executable, str(REPO / "pretrain_sft.py"), "--config", config], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 120
    metrics_path = tmp_path / "ckpt" / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    last_step = train_records(tmp_path / "ckpt")[-1]["step"]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(last_step)
    assert (tmp_path / "ckpt" / f"iter_{last_step:07d}" / "config.yaml").exists()
    assert "SIGTERM" in stderr


def test_crash_mid_save_leaves_previous_checkpoint_loadable(data, tmp_path, monkeypatch):
    _, train, _ = data
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": train}, training={"train_steps": 2})
    save = tmp_path / "ckpt"
    run(config, f"--checkpoint.save={save}")
    # a later save that died half way: its files exist only under the .incomplete name
    (save / "iter_0000004.incomplete").mkdir()
    (save / "iter_0000004.incomplete" / "__0_0.distcp").write_bytes(b"partial")
    proc = run(config, f"--checkpoint.load={save}", f"--checkpoint.save={save}", "--training.train_steps=3")
    assert "resumed from" in proc.stderr and "iter_0000002" in proc.stderr
    assert not (save / "iter_0000004.incomplete").exists()  # cleaned by the next save
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_save_failure_keeps_the_pointer(tmp_path, monkeypatch):
    from megatron_sft import checkpoint_files
    from megatron_sft.training import checkpoint as ckpt

    (tmp_path / "iter_0000001").mkdir()
    (tmp_path / checkpoint_files.LATEST_FILE).write_text("1\n")

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt.dist_checkpointing, "save", crash)
    with pytest.raises(ValueError, match="cannot save checkpoint .*iter_0000002: RuntimeError: disk full"):
        ckpt.save_checkpoint(str(tmp_path), 2, {}, {"config.yaml": "x"}, run_id="r", history=[1])
    assert checkpoint_files.latest_iteration(str(tmp_path)) == 1
    assert not (tmp_path / "iter_0000002").exists()


def test_the_model_learns_a_small_memorisable_set(tmp_path):
    train = write_packed(tmp_path / "train", conversations(6, seed=3, min_len=24, max_len=32), seq_length=64)
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": train, "seq_length": 64},
                          training={"train_steps": 150, "global_batch_size": 2, "lr": 3e-3, "min_lr": 3e-4,
                                    "lr_warmup_steps": 10})
    run(config, f"--logging.dir={tmp_path / 'logs'}")
    losses = [r["loss"] for r in train_records(tmp_path / "logs")]
    assert losses[0] > 4.0 and losses[-1] < 0.5, losses[::10]  # from ~ln(128) = 4.85


def test_eval_only_prints_one_line_and_records_it(data, tmp_path):
    _, train, valid = data
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": train, "valid_prefix": valid})
    proc = run(config, "--eval-only", f"--logging.dir={tmp_path / 'logs'}")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"eval_loss=\d+\.\d+ eval_tokens=\d+", lines[0]), proc.stdout
    record = metrics(tmp_path / "logs")[-1]
    assert f"eval_loss={record['eval_loss']:.6f}" in lines[0] and f"eval_tokens={record['eval_tokens']}" in lines[0]


def test_eval_loss_does_not_depend_on_packing(tmp_path):
    convs = conversations(30, seed=5, min_len=20, max_len=120)
    lengths = [len(t) for t, _ in convs]
    big = write_packed(tmp_path / "p4k", convs, seq_length=4096)
    small = write_packed(tmp_path / "p512", convs, seq_length=512)
    alone = write_packed(tmp_path / "alone", convs, seq_length=512, packs=[[i] for i in range(len(convs))])
    config = write_config(tmp_path / "c.yaml", model={"max_position_embeddings": 4096},
                          data={"train_prefix": small, "valid_prefix": small, "seq_length": 4096},
                          training={"global_batch_size": 2})
    run(config, "--training.train_steps=3", f"--checkpoint.save={tmp_path / 'init'}")  # non-trivial weights
    results = {}
    for name, prefix in (("p4k", big), ("p512", small), ("alone", alone)):
        out = run(config, "--eval-only", f"--data.valid_prefix={prefix}", f"--checkpoint.load={tmp_path / 'init'}")
        loss, tokens = re.fullmatch(r"eval_loss=(\S+) eval_tokens=(\d+)", out.stdout.strip()).groups()
        results[name] = (float(loss), int(tokens))
    assert sum(lengths) > 4096 // 2 and results["p4k"][1] == results["p512"][1] == results["alone"][1]
    assert results["p4k"][0] == pytest.approx(results["alone"][0], rel=1e-5)
    assert results["p512"][0] == pytest.approx(results["alone"][0], rel=1e-5)


def test_sigterm_to_every_worker_of_a_two_process_run(data, tmp_path):
    """SLURM signals every task (srun --signal / preemption): all ranks agree on the step to stop
    after, save together and exit 0, so torchrun exits 0 too."""
    import psutil

    _, train, _ = data
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": train}, training={"train_steps": 100000},
                          checkpoint={"save": str(tmp_path / "ckpt")})
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                             f"--master-port={port}", str(REPO / "pretrain_sft.py"), "--config", config],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    metrics_path = tmp_path / "ckpt" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    workers[0].send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the ranks see the signal at different steps
    workers[1].send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    last_step = train_records(tmp_path / "ckpt")[-1]["step"]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(last_step)
