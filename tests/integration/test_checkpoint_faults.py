"""Checkpoint faults end to end (pretrain_sft.py in subprocesses): corrupted, truncated and missing
files, config drift on resume, a pretrained model of another shape, a deleted pointer, a save
directory of another run, a directory in use by a running trainer, a mistyped --eval-only load and a read-only save
directory. Each case asserts the message (naming the file and the fix), the exit code, no
traceback, and that every valid checkpoint is still there.

One two-process run (module fixture) writes SAVE/iter_0000002 and iter_0000004 (keep_last=0);
every case works on its own copy."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.trainer_helpers import (REPO, conversations, free_port, metrics, run, train_records,
                                               write_config, write_packed)

pytestmark = pytest.mark.slow
POINTER = "latest_checkpointed_iteration.txt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_faults")
    train = write_packed(root / "train", conversations(24, seed=0), seq_length=256)
    valid = write_packed(root / "valid", conversations(8, seed=1), seq_length=256)
    config = write_config(root / "c.yaml", data={"train_prefix": train, "valid_prefix": valid},
                          training={"train_steps": 4, "lr_decay_steps": 8})
    run(config, f"--checkpoint.save={root / 'save'}", "--checkpoint.save_interval_steps=2", nproc=2)
    return root, config


@pytest.fixture
def save(trained, tmp_path):
    root, _ = trained
    shutil.copytree(root / "save", tmp_path / "save")
    return tmp_path / "save"


def snapshot(directory: Path) -> dict:
    """{relative path: bytes} of every file (what 'nothing valid was lost' compares)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def fails(config, *args, nproc=1):
    proc = run(config, *args, check=False, timeout=240, nproc=nproc)
    assert proc.returncode == 1 if nproc == 1 else proc.returncode != 0, (proc.returncode, proc.stderr[-3000:])
    # torchrun prints a traceback of its own when a worker exits 1; none may come from the trainer
    assert ("Traceback" if nproc == 1 else 'pretrain_sft.py", line') not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def resume(config, save, *args):
    return (config, f"--checkpoint.load={save}", f"--checkpoint.save={save}", *args)


def flip_bytes(path: Path, offset: int, count: int = 4) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


# ------------------------------------------------------------------------------ integrity


def test_flipped_truncated_and_missing_files_refuse_to_resume_on_every_rank(trained, save):
    _, config = trained
    shard, meta, common = (save / "iter_0000004" / name for name in ("__1_0.distcp", ".metadata", "metadata.json"))
    flip_bytes(shard, shard.stat().st_size // 2)
    meta.write_bytes(meta.read_bytes()[:100])
    common.unlink()
    before = snapshot(save)
    stderr = fails(*resume(config, save), nproc=2)
    for problem in (f"{shard} has crc32", f"{meta} has 100 bytes", f"{common} is missing"):
        assert problem in stderr
    assert "fallback_to_previous=true" in stderr
    assert snapshot(save) == before  # nothing pruned, pointer unchanged


def test_fallback_resumes_from_the_newest_checkpoint_that_verifies(trained, save):
    _, config = trained
    flip_bytes(save / "iter_0000004" / "__0_0.distcp", 1000)
    proc = run(*resume(config, save, "--checkpoint.fallback_to_previous=true", "--training.train_steps=6",
                       "--checkpoint.save_interval_steps=2", "--checkpoint.keep_last=1",
                       "--training.global_batch_size=8"))
    assert "fails verification" in proc.stderr and "resuming from " + str(save / "iter_0000002") in proc.stderr
    assert "training.global_batch_size: checkpoint 4, this run 8" in proc.stderr  # an allowed change, logged
    assert (save / POINTER).read_text().strip() == "6"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000006"]  # broken 4 replaced, then pruned
    steps = [r["step"] for r in train_records(save)]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # one record per step after the resume


# ------------------------------------------------------------------------------ compatibility


def test_resume_with_another_model_shape_lists_every_difference(trained, save):
    _, config = trained
    before = snapshot(save)
    stderr = fails(*resume(config, save, "--model.num_layers=2", "--model.hidden_size=32"))
    assert "model.num_layers: checkpoint 4, this run 2" in stderr
    assert "model.hidden_size: checkpoint 64, this run 32" in stderr and "--checkpoint.pretrained" in stderr
    assert snapshot(save) == before


def test_pretrained_of_another_vocabulary_is_refused(trained, save, tmp_path):
    _, config = trained
    model = tmp_path / "model"  # like a converted dir without a config.yaml or manifest
    shutil.copytree(save / "iter_0000002", model)
    (model / "config.yaml").unlink()
    (model / "manifest.json").unlink()
    stderr = fails(config, f"--checkpoint.pretrained={model}", "--model.vocab_size=256")
    assert "embedding.word_embeddings.weight: checkpoint [128, 64], this model [256, 64]" in stderr
    assert f"checkpoint.pretrained={model} holds another model" in stderr


# ------------------------------------------------------------------------------ directory state


def test_deleted_pointer_resumes_from_the_newest_checkpoint(trained, save):
    _, config = trained
    (save / POINTER).unlink()
    proc = run(*resume(config, save, "--training.train_steps=6", "--checkpoint.keep_last=2"))
    assert "no valid latest_checkpointed_iteration.txt" in proc.stderr
    assert "resumed from " + str(save / "iter_0000004") in proc.stderr
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000004", "iter_0000006"]


def test_fresh_run_refuses_a_directory_of_another_run_unless_told(trained, save):
    _, config = trained
    before = snapshot(save)
    stderr = fails(config, f"--checkpoint.save={save}", "--training.train_steps=2")
    assert f"checkpoint.save={save} holds 2 checkpoint(s) of another run" in stderr
    assert "--checkpoint.overwrite=true" in stderr and f"--checkpoint.load={save}" in stderr
    assert snapshot(save) == before  # metrics.jsonl included
    proc = run(config, f"--checkpoint.save={save}", "--training.train_steps=2", "--checkpoint.keep_last=1",
               "--checkpoint.overwrite=true")
    assert "checkpoint.overwrite=true" in proc.stderr
    assert (save / POINTER).read_text().strip() == "2"
    assert before["iter_0000004/__0_0.distcp"] == (save / "iter_0000004" / "__0_0.distcp").read_bytes()  # kept


def test_a_second_run_on_a_save_directory_in_use_is_refused(trained, save):
    """Run A trains on SAVE; run B (the same command) stops at start-up naming A's pid; A, told
    to stop, saves normally and its metrics hold no record of B."""
    _, config = trained
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_PORT=str(free_port()))
    first = subprocess.Popen([sys.executable, str(REPO / "pretrain_sft.py"), "--config", config,
                              f"--checkpoint.load={save}", f"--checkpoint.save={save}", "--training.train_steps=100000"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and \
                (save / "metrics.jsonl").read_text().count("\n") < 5:
            time.sleep(0.2)  # the copied metrics hold steps 1-4: wait for step 5
        stderr = fails(*resume(config, save, "--training.train_steps=6"))
        assert f"checkpoint.save={save} is in use by another run (host " in stderr and f"pid {first.pid} " in stderr
    finally:
        first.send_signal(signal.SIGTERM)
        _, first_stderr = first.communicate(timeout=120)
    assert first.returncode == 0, first_stderr[-3000:]
    last = train_records(save)[-1]["step"]
    assert (save / POINTER).read_text().strip() == str(last) and last >= 5
    assert [r["step"] for r in train_records(save)] == list(range(1, last + 1))


def test_eval_only_with_a_mistyped_load(trained, save, tmp_path):
    _, config = trained
    before = snapshot(save)
    stderr = fails(config, "--eval-only", f"--checkpoint.load={tmp_path / 'svae'}", f"--logging.dir={save}")
    assert f"checkpoint.load={tmp_path / 'svae'} does not exist" in stderr
    assert snapshot(save) == before


def _make_read_only(directory: Path):
    """chmod a-w, or for root (which chmod does not stop) the immutable attribute; None when
    neither stops this user from creating a file there."""
    directory.chmod(0o555)
    undo = [lambda: directory.chmod(0o755)]
    if os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0:
        undo.insert(0, lambda: subprocess.run(["chattr", "-i", str(directory)], check=True))
    try:
        (directory / "probe").touch()
    except OSError:
        return undo
    (directory / "probe").unlink()
    for step in undo:
        step()
    return None


def test_read_only_save_directory_fails_the_save_clearly(trained, save):
    _, config = trained
    undo = _make_read_only(save)
    if undo is None:
        pytest.skip("cannot make a directory read-only for this user (root without chattr)")
    try:
        before = snapshot(save)
        stderr = fails(*resume(config, save, "--training.train_steps=5"))
        assert f"cannot save checkpoint {save / 'iter_0000005'}: cannot write to" in stderr
        assert "The previous checkpoint is intact (latest_checkpointed_iteration.txt still names iteration 4)" in stderr
        assert {k: v for k, v in snapshot(save).items() if k != "metrics.jsonl"} == \
            {k: v for k, v in before.items() if k != "metrics.jsonl"}
        assert [r["step"] for r in metrics(save) if "loss" in r][-1] == 5
    finally:
        for step in undo:
            step()
