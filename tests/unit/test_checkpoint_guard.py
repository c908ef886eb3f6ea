"""Checkpoint guard pieces in one process, without a model: manifests and verification, the
save-dir lock, ownership and pruning along a run's history, plain messages for a full or
read-only disk (a save that fails leaves the pointer and every earlier checkpoint intact), and
the comparison of a saved config with a resumed run's."""

from __future__ import annotations

import errno
import json
import os

import pytest

from megatron_sft import checkpoint_files
from megatron_sft.training import checkpoint_guard as guard


def fake_checkpoint(root, iteration: int, run_id: str, history, payload: bytes = b"x" * 5000) -> str:
    path = os.path.join(root, f"iter_{iteration:07d}")
    os.makedirs(path)
    for name, data in (("__0_0.distcp", payload), (".metadata", b"meta"), ("metadata.json", b"{}")):
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    entries = checkpoint_files.checksum(path, checkpoint_files.own_shard_files(path, 0) + checkpoint_files.shared_files(path))
    checkpoint_files.write_manifest(path, entries, iteration, run_id, list(history))
    return path


def test_verify_names_each_changed_truncated_or_missing_file(tmp_path):
    path = fake_checkpoint(tmp_path, 2, "a", [2])
    assert checkpoint_files.verify(path) == []
    with open(os.path.join(path, "__0_0.distcp"), "r+b") as f:
        f.seek(2500)
        f.write(b"y")
    os.truncate(os.path.join(path, ".metadata"), 2)
    os.unlink(os.path.join(path, "metadata.json"))
    problems = checkpoint_files.verify(path)
    assert any(p.startswith(os.path.join(path, "__0_0.distcp") + " has crc32") for p in problems)
    assert any(p.startswith(os.path.join(path, ".metadata") + " has 2 bytes, 4 when saved") for p in problems)
    assert os.path.join(path, "metadata.json") + " is missing" in problems


def test_an_unreadable_manifest_is_a_problem_not_a_traceback(tmp_path):
    path = fake_checkpoint(tmp_path, 2, "a", [2])
    with open(os.path.join(path, checkpoint_files.MANIFEST), "w") as f:
        f.write('{"files": ')
    [problem] = checkpoint_files.verify(path)
    assert f"{os.path.join(path, checkpoint_files.MANIFEST)} is unreadable" in problem


def test_crc32_streams_in_chunks(tmp_path, monkeypatch):
    import zlib

    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setattr(checkpoint_files, "CHUNK_BYTES", 1024)
    assert checkpoint_files.file_crc32(str(tmp_path / "f")) == f"{zlib.crc32(data):08x}"


def test_pruning_follows_this_runs_history_never_another_run(tmp_path):
    for iteration, run_id, history in ((5, "other", [5]), (30, "other", [5, 30]), (10, "me", [10]),
                                       (20, "me", [10, 20]), (15, "me", [10, 20, 15])):
        fake_checkpoint(tmp_path, iteration, run_id, history)
    # save order 10, 20, 15 (a fallback from 20 to 10 re-saved 15): keep_last=1 keeps 15, the newest
    # in this run's history, though 20 and 30 have higher numbers; the other run's are never touched
    assert guard.prunable(str(tmp_path), [10, 20, 15], "me", 1) == [str(tmp_path / "iter_0000010"),
                                                                    str(tmp_path / "iter_0000020")]
    assert guard.foreign_checkpoints(str(tmp_path), "me", adopt_unowned=False) == [
        str(tmp_path / "iter_0000005"), str(tmp_path / "iter_0000030")]


def test_nothing_is_pruned_when_the_new_checkpoint_does_not_verify(tmp_path):
    fake_checkpoint(tmp_path, 10, "me", [10])
    newest = fake_checkpoint(tmp_path, 20, "me", [10, 20])
    os.truncate(os.path.join(newest, "__0_0.distcp"), 10)
    assert guard.prunable(str(tmp_path), [10, 20], "me", 1) == []


def test_the_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    first = guard.SaveDirLock(str(tmp_path / "save"))
    first.acquire()
    try:
        with pytest.raises(checkpoint_files.CheckpointError, match=r"is in use by another run \(host .* pid %d" % os.getpid()):
            guard.SaveDirLock(str(tmp_path / "save")).acquire()
    finally:
        first.release()
    second = guard.SaveDirLock(str(tmp_path / "save"))
    second.acquire()  # released: free again
    second.release()


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on"), (errno.EROFS, "cannot write to"),
                                         (errno.EACCES, "cannot write to")])
def test_os_errors_inside_torch_checkpoint_exceptions_are_described(tmp_path, code, words):
    from torch.distributed.checkpoint.api import CheckpointException

    inner = OSError(code, os.strerror(code), str(tmp_path / "f.distcp"))
    wrapped = CheckpointException("save failed", {1: (inner, None)})
    assert guard.describe_os_error(wrapped, "x").startswith(f"{words} {tmp_path / 'f.distcp'}")


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from megatron_sft.training import checkpoint as ckpt

    previous = fake_checkpoint(tmp_path, 1, "me", [1])
    (tmp_path / checkpoint_files.LATEST_FILE).write_text("1\n")
    before = {name: open(os.path.join(previous, name), "rb").read() for name in os.listdir(previous)}

    def disk_full(state, directory):
        with open(os.path.join(directory, "__0_0.distcp"), "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(directory, "__0_0.distcp"))

    monkeypatch.setattr(ckpt.dist_checkpointing, "save", disk_full)
    with pytest.raises(checkpoint_files.CheckpointError) as err:
        ckpt.save_checkpoint(str(tmp_path), 2, {}, {"config.yaml": "x"}, run_id="me", history=[1], keep_last=1)
    message = str(err.value)
    assert f"cannot save checkpoint {tmp_path / 'iter_0000002'}: no space left on {tmp_path}" in message
    assert "still names iteration 1" in message
    assert checkpoint_files.latest_iteration(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", checkpoint_files.LATEST_FILE]  # no .incomplete left
    assert {name: open(os.path.join(previous, name), "rb").read() for name in os.listdir(previous)} == before


def test_config_differences_separate_model_errors_from_allowed_changes():
    from megatron_sft.training.resume_compat import config_differences

    saved = {"model": {"num_layers": 4, "hidden_size": 64, "attention_backend": "torch",
                       "rope_scaling": None},
             "training": {"global_batch_size": 4, "lr": 1e-3, "train_steps": 10}, "checkpoint": {"load": None}}
    current = json.loads(json.dumps(saved))
    current["model"].update(num_layers=2, attention_backend="te", rope_scaling={"factor": 8.0})
    current["training"].update(global_batch_size=8, lr=5e-4, lr_warmup_steps=3, train_steps=20)
    current["checkpoint"]["load"] = "runs/x"  # where a run reads and writes: not a change worth a line
    errors, changes, kept = config_differences(saved, current)
    assert errors == ["model.num_layers: checkpoint 4, this run 2",
                      'model.rope_scaling: checkpoint null, this run {"factor": 8.0}']
    assert changes == ['model.attention_backend: checkpoint "torch", this run "te"',
                       "training.global_batch_size: checkpoint 4, this run 8",
                       "training.train_steps: checkpoint 10, this run 20"]
    assert kept == ["training.lr: checkpoint 0.001, this run 0.0005",
                    "training.lr_warmup_steps: checkpoint unset, this run 3"]


def test_resume_candidates_pointer_first_then_older_or_one_iter_dir(tmp_path):
    from megatron_sft.training import checkpoint as ckpt

    for iteration in (2, 4, 6):
        fake_checkpoint(tmp_path, iteration, "me", [iteration])
    (tmp_path / checkpoint_files.LATEST_FILE).write_text("4\n")
    assert ckpt._candidates(str(tmp_path)) == [str(tmp_path / "iter_0000004"), str(tmp_path / "iter_0000002")]
    (tmp_path / checkpoint_files.LATEST_FILE).unlink()  # deleted pointer: newest first
    assert ckpt._candidates(str(tmp_path))[0] == str(tmp_path / "iter_0000006")
    one = str(tmp_path / "iter_0000002")  # one iter_* dir given as checkpoint.load
    assert ckpt._candidates(one) == [one]
    assert ckpt._candidates(str(tmp_path / "empty")) == []
