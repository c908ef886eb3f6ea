"""Signals and helper processes: SIGTERM to the whole process group (as SLURM sends it to a job
step) still ends in a saved, loadable checkpoint and exit 0; a kill -9 of the trainer leaves no
orphaned helper processes; two single-process runs on one host do not collide on a port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.integration.trainer_helpers import REPO, conversations, train_records, write_config, write_packed

pytestmark = pytest.mark.slow


def _start(config: str, log, *args: str) -> subprocess.Popen:
    """pretrain_sft.py as a single process (no MASTER_PORT) leading its own process group;
    stdout and stderr go to the file ``log`` (pipes could fill while another run is awaited)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(REPO / "pretrain_sft.py"), "--config", config, *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def _wait_for_steps(proc: subprocess.Popen, log, metrics_path, num_steps: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics_path.exists() and len(train_records(metrics_path.parent)) >= num_steps:
            return
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise AssertionError(f"no {num_steps} training steps: exit {proc.returncode}\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def group_sigterm(tmp_path_factory):
    """A run with a DataLoader worker and periodic saves, SIGTERMed as a whole process group
    after its fourth step (so Megatron's checkpoint writer has run before the signal too)."""
    root = tmp_path_factory.mktemp("processes")
    train = write_packed(root / "train", conversations(40, seed=0), seq_length=256)
    config = write_config(root / "c.yaml", data={"train_prefix": train, "num_workers": 1},
                          training={"train_steps": 100000},
                          checkpoint={"save": str(root / "ckpt"), "save_interval_steps": 2})
    log = root / "sigterm.log"
    proc = _start(config, log)
    _wait_for_steps(proc, log, root / "ckpt" / "metrics.jsonl", 4)
    helpers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    return root, config, proc.returncode, log.read_text(), helpers


def test_sigterm_to_the_process_group_saves_and_exits_zero(group_sigterm):
    root, _, returncode, stderr, helpers = group_sigterm
    assert returncode == 0, stderr[-3000:]
    assert len(helpers) == 1, [h.cmdline() for h in helpers]  # the DataLoader worker only
    last_step = train_records(root / "ckpt")[-1]["step"]
    assert last_step >= 4 and "SIGTERM: saving at step" in stderr
    assert (root / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(last_step)


def test_kill_9_of_the_trainer_leaves_no_orphans(group_sigterm):
    """Resumes from the SIGTERM checkpoint (it loads), saves once more, then gets SIGKILL: its
    DataLoader worker is gone within seconds and no checkpoint-writer process ever existed."""
    root, config, *_ = group_sigterm
    saved = int((root / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    log = root / "kill9.log"
    proc = _start(config, log, f"--checkpoint.load={root / 'ckpt'}", "--checkpoint.save_interval_steps=1")
    _wait_for_steps(proc, log, root / "ckpt" / "metrics.jsonl", saved + 2)
    helpers = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait(timeout=30)
    stderr = log.read_text()
    assert f"resumed from {root / 'ckpt' / f'iter_{saved:07d}'}" in stderr
    assert len(helpers) == 1, [h.cmdline() for h in helpers]
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(h) for h in helpers):
        time.sleep(0.1)
    left = [h.pid for h in helpers if _alive(h)]
    for h in helpers:
        if _alive(h):
            h.kill()
    assert not left, f"orphaned helper processes {left}"


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_two_single_process_runs_on_one_host(group_sigterm, tmp_path):
    root, config, *_ = group_sigterm
    runs = [_start(config, tmp_path / f"{i}.log", "--training.train_steps=2", "--data.num_workers=0",
                   f"--checkpoint.save={tmp_path / str(i)}") for i in range(2)]
    for i, proc in enumerate(runs):
        assert proc.wait(timeout=180) == 0, (tmp_path / f"{i}.log").read_text()[-3000:]
    assert all(len(train_records(tmp_path / str(i))) == 2 for i in range(2))
