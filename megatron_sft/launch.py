"""Process-group environment for the launchers we support, without importing torch.

torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` itself.
Under SLURM we prefer ``srun python pretrain_sft.py`` with one task per GPU (no torchrun): every
rank then receives SLURM's SIGTERM directly and can finish its step and save, instead of being
killed by torchrun's 30-second shutdown. ``slurm_to_torch_env`` maps srun's variables to the
env:// names; the batch script exports ``MASTER_ADDR``/``MASTER_PORT`` (tools/launch/slurm_sft.sbatch).
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

from megatron_sft.errors import InputError


def slurm_to_torch_env(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Fill RANK, WORLD_SIZE and LOCAL_RANK from an srun job step's ``SLURM_PROCID``,
    ``SLURM_STEP_NUM_TASKS`` and ``SLURM_LOCALID``. Does nothing (returns False) when RANK is
    already set (torchrun) or outside an srun step (``SLURM_STEP_NUM_TASKS`` absent, e.g. a bare
    ``python`` line in a batch script, which must stay a world of one)."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_STEP_NUM_TASKS" not in env:
        return False
    missing = [name for name in ("SLURM_PROCID", "SLURM_LOCALID") if name not in env]
    if missing:
        raise InputError(f"srun job step without {', '.join(missing)}: launch with srun or torchrun")
    world = int(env["SLURM_STEP_NUM_TASKS"])
    if world > 1 and "MASTER_ADDR" not in env:
        raise InputError("srun with several tasks needs MASTER_ADDR (and MASTER_PORT) exported: the first host "
                         "of the job, e.g. export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | "
                         "head -n1); tools/launch/slurm_sft.sbatch does this")
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = env["SLURM_PROCID"], str(world), env["SLURM_LOCALID"]
    return True
