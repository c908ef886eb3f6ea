"""srun-launched ranks get env:// variables; torchrun's and single processes are left alone."""

import pytest

from megatron_sft.launch import slurm_to_torch_env

SRUN = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16",
        "MASTER_ADDR": "node001", "MASTER_PORT": "23456"}


def test_srun_step_maps_to_rank_world_and_local_rank():
    env = dict(SRUN)
    assert slurm_to_torch_env(env) is True
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("9", "16", "1")


def test_torchrun_variables_win():
    env = {**SRUN, "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}
    assert slurm_to_torch_env(env) is False
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "8", "3")


def test_batch_script_without_srun_stays_a_world_of_one():
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert slurm_to_torch_env(env) is False
    assert "RANK" not in env and "WORLD_SIZE" not in env


def test_several_tasks_without_master_addr_is_an_error():
    env = {k: v for k, v in SRUN.items() if k != "MASTER_ADDR"}
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        slurm_to_torch_env(env)


def test_srun_step_without_rank_variables_is_an_error():
    env = {k: v for k, v in SRUN.items() if k != "SLURM_PROCID"}
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        slurm_to_torch_env(env)
    assert "RANK" not in env


def test_pretrain_sft_exits_2_on_a_broken_srun_environment(monkeypatch, capsys):
    import pretrain_sft

    for name, value in SRUN.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_PROCID")
    monkeypatch.delenv("RANK", raising=False)
    assert pretrain_sft.main(["--config", "unused.yaml"]) == 2
    assert "SLURM_PROCID" in capsys.readouterr().err
