"""Metrics output: console lines a person can read (no ``mfu None``; per rank on CPU), stable JSON
keys, one row per (kind, step) across resumed and --eval-only runs, TensorBoard purge on resume,
and W&B logging through a fake ``wandb`` module (no network)."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import sys
import types

import pytest

from megatron_sft.training.metrics import MetricsWriter, console_line, read_metrics


def step_record(step: int, loss: float = 1.0, **extra) -> dict:
    record = {"step": step, "loss": loss, "grad_norm": 0.5, "lr": 1e-3, "supervised_tokens": 100,
              "tokens_per_s_per_gpu": 4917.62, "tflops_per_gpu": 0.0269, "mfu": None, "step_time_s": 0.39,
              "memory_gib": 0.48, "epoch": 0, "loss/train": loss}
    record.update(extra)
    return record


def eval_record(step: int, loss: float = 2.0) -> dict:
    return {"step": step, "eval_loss": loss, "eval_tokens": 203, "eval_loss/valid": loss}


def lines(path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_console_line_on_cpu_leaves_out_absent_values_and_says_per_rank():
    text = console_line(step_record(10, 5.4151), cuda=False)
    assert text.startswith("step 10 | loss 5.4151 | grad_norm 0.5000 | lr 0.0010 | supervised_tokens 100")
    assert "tokens/s/rank 4917.6 | TFLOP/s/rank 0.0269" in text and "max_rss_gib 0.4800" in text
    assert "mfu" not in text and "None" not in text and "per_gpu" not in text
    assert "loss/train" not in text  # the only source: equal to loss
    assert console_line(eval_record(5, 5.7989), cuda=False) == "step 5 | eval_loss 5.7989 | eval_tokens 203"


def test_console_line_on_gpu_shows_mfu_and_every_source():
    record = step_record(3, 2.0, mfu=0.3399, **{"loss/chat": 1.5, "loss/tools": 2.5})
    text = console_line(record, cuda=True)
    assert "tokens/s/gpu 4917.6 | TFLOP/s/gpu 0.0269 | mfu 34.0%" in text and "memory_gib 0.4800" in text
    assert "loss/train 2.0000 | loss/chat 1.5000 | loss/tools 2.5000" in text
    assert "skipped" in console_line(step_record(4, float("nan"), skipped=True), cuda=False)


def test_records_keep_their_keys(tmp_path, caplog):
    writer = MetricsWriter(str(tmp_path), rank=0, tensorboard=False)
    with caplog.at_level(logging.INFO, logger="megatron_sft"):
        writer.write(step_record(1))
    writer.close()
    (saved,) = lines(tmp_path / "metrics.jsonl")
    assert saved == step_record(1)  # mfu stays null, keys stay *_per_gpu for tools
    assert "step 1 | loss" in caplog.text


def test_other_ranks_write_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path / "logs"), rank=1, tensorboard=True)
    writer.write(step_record(1))
    writer.close()
    assert not (tmp_path / "logs").exists()


def test_resumed_run_replaces_the_steps_it_redoes(tmp_path):
    first = MetricsWriter(str(tmp_path), rank=0, tensorboard=False)
    for step in range(1, 7):  # checkpoint at 3, then a crash after step 6 (never closed)
        first.write(step_record(step, loss=10.0 + step))
        if step % 3 == 0:
            first.write(eval_record(step, loss=20.0 + step))
    second = MetricsWriter(str(tmp_path), rank=0, tensorboard=False)  # resumes at step 3
    for step in range(4, 9):
        second.write(step_record(step, loss=30.0 + step))
        if step % 3 == 0:
            second.write(eval_record(step, loss=40.0 + step))
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 3, 4, 5, 6, 6, 7, 8]  # before close
    second.close()
    rows = lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("loss", r.get("eval_loss"))) for r in rows] == [
        (1, 11.0), (2, 12.0), (3, 13.0), (3, 23.0), (4, 34.0), (5, 35.0), (6, 36.0), (6, 46.0), (7, 37.0),
        (8, 38.0)]


def test_eval_only_replaces_the_eval_row_of_its_step_only(tmp_path):
    train = MetricsWriter(str(tmp_path), rank=0, tensorboard=False)
    for step in (10, 20):
        train.write(step_record(step))
        train.write(eval_record(step, loss=4.49))
    train.close()
    eval_only = MetricsWriter(str(tmp_path), rank=0, tensorboard=False)
    eval_only.write(eval_record(20, loss=4.48))
    eval_only.close()
    rows = lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], "eval_loss" in r) for r in rows] == [(10, False), (10, True), (20, False), (20, True)]
    assert rows[-1]["eval_loss"] == 4.48


def test_read_metrics_errors_and_broken_lines(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match=f"no metrics file at {tmp_path}/metrics.jsonl"):
        read_metrics(str(tmp_path))
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(step_record(1)) + "\n" + '{"step": 2, "lo')  # a run killed mid-line
    with caplog.at_level(logging.WARNING, logger="megatron_sft"):
        assert [r["step"] for r in read_metrics(str(path))] == [1]
    assert f"{path}:2: skipping a line" in caplog.text
    MetricsWriter(str(tmp_path), rank=0, tensorboard=False).close()  # opening repairs the file
    assert path.read_text() == json.dumps(step_record(1)) + "\n"


def test_tensorboard_purges_what_a_resumed_run_redoes(tmp_path, monkeypatch):
    opened = []

    class FakeSummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            opened.append((log_dir, purge_step))
            self.scalars = []

        def add_scalar(self, key, value, step):
            self.scalars.append((key, value, step))

        def close(self):
            pass

    monkeypatch.setattr("torch.utils.tensorboard.SummaryWriter", FakeSummaryWriter)
    resumed = MetricsWriter(str(tmp_path), rank=0, tensorboard=True)
    resumed.write(step_record(4))
    assert ("mfu" not in {k for k, _, _ in resumed._tb.scalars}) and ("loss", 1.0, 4) in resumed._tb.scalars
    resumed.close()
    eval_only = MetricsWriter(str(tmp_path), rank=0, tensorboard=True)
    eval_only.write(eval_record(4))
    eval_only.close()
    assert opened == [(str(tmp_path / "tensorboard"), 4), (str(tmp_path / "tensorboard"), None)]


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, values, step):
            calls["log"].append((values, step))

        def finish(self):
            calls["finish"] += 1

    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = lambda **kwargs: calls["init"].append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_gets_the_same_records(tmp_path, fake_wandb):
    run_dir = tmp_path / "run7"
    writer = MetricsWriter(str(run_dir), rank=0, tensorboard=False, wandb_project="sft",
                           wandb_config={"training": {"lr": 1e-3}})
    writer.write(step_record(1, skipped=True))
    writer.write(eval_record(1))
    writer.close()
    assert fake_wandb["init"] == [{"project": "sft", "name": "run7", "dir": str(run_dir),
                                   "config": {"training": {"lr": 1e-3}}}]
    (train_values, train_step), (eval_values, eval_step) = fake_wandb["log"]
    expected = {k: v for k, v in step_record(1).items() if k != "step" and v is not None}
    assert (train_values, train_step) == (expected, 1)  # no null mfu, no bool flags
    assert (eval_values, eval_step) == ({"eval_loss": 2.0, "eval_tokens": 203, "eval_loss/valid": 2.0}, 1)
    assert fake_wandb["finish"] == 1


def test_wandb_only_on_rank_zero(tmp_path, fake_wandb):
    MetricsWriter(str(tmp_path), rank=1, tensorboard=False, wandb_project="sft").close()
    assert fake_wandb["init"] == []


def test_wandb_missing_is_an_error_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as when not installed
    for rank in (0, 1):  # every rank, so none waits for a rank that stopped
        with pytest.raises(ValueError, match=r"logging.wandb_project='sft' needs the wandb package: pip install wandb"):
            MetricsWriter(str(tmp_path), rank=rank, tensorboard=False, wandb_project="sft")

