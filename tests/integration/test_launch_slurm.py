"""The SLURM launch path: two ranks started the way ``srun`` starts them (SLURM_PROCID,
SLURM_LOCALID, SLURM_STEP_NUM_TASKS, MASTER_ADDR/PORT; no torchrun) form one data-parallel run
whose losses equal the single-process run's (tools/launch/slurm_sft.sbatch)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.trainer_helpers import (REPO, conversations, free_port, run, train_records, write_config,
                                               write_packed)

pytestmark = pytest.mark.slow


def test_srun_style_ranks_train_as_data_parallel(tmp_path):
    train = write_packed(tmp_path / "train", conversations(24, seed=2), seq_length=256)
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": train}, training={"train_steps": 2})
    run(config, "--training.train_steps=1", f"--checkpoint.save={tmp_path / 'init'}")
    common = [f"--checkpoint.pretrained={tmp_path / 'init'}"]
    run(config, *common, f"--logging.dir={tmp_path / 'ref'}")

    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = []
    for rank in range(2):
        env = dict(base, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "pretrain_sft.py"), "--config", config, *common,
                                       f"--logging.dir={tmp_path / 'srun'}"], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "world size 2 = TP 1 x PP 1 x CP 1 x DP 2" in outputs[0][1]
    got, ref = train_records(tmp_path / "srun"), train_records(tmp_path / "ref")
    assert [r["step"] for r in got] == [1, 2]
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["supervised_tokens"] == b["supervised_tokens"]
