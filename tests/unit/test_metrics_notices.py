"""Third-party notices (Megatron deprecations, Apex fallbacks, torch.distributed.checkpoint) become
one DEBUG line each instead of stderr spam, while real warnings still show. Checked in a fresh
process (the notices fire once per process) that builds a tiny GPTModel and saves and loads it
with dist_checkpointing, with DEBUG logging on so the hidden lines can be counted."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.integration.trainer_helpers import REPO, free_port

SCRIPT = textwrap.dedent("""
    import logging, os, sys, warnings
    logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    import megatron_sft.mcore  # the filter is installed here
    from megatron.core import dist_checkpointing
    from megatron_sft.config import ModelConfig, ParallelConfig
    from megatron_sft.model.build import build_gpt_model
    from megatron_sft.runtime import initialize_distributed, setup_model_parallel, teardown_model_parallel

    os.makedirs(sys.argv[1], exist_ok=True)
    initialize_distributed()
    setup_model_parallel(ParallelConfig())
    model = build_gpt_model(ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                                        vocab_size=64, max_position_embeddings=64), ParallelConfig(), backend="torch")
    dist_checkpointing.save(model.sharded_state_dict(), sys.argv[1])
    dist_checkpointing.load(model.sharded_state_dict(), sys.argv[1])
    warnings.warn("a real warning from user code")
    teardown_model_parallel()
    print("built")
""")

NOTICES = ["GPTModel IS DEPRECATED", "Apex is not installed", "full scope is deprecated",
           "is experimental and still under active development", "MCore's async save is deprecated",
           "torch.distributed is disabled", "argument order of load has been changed"]


def test_notices_become_one_debug_line_each_and_real_warnings_show(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-W", "default", "-c", SCRIPT, str(tmp_path / "ckpt")], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "built" in proc.stdout, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    hidden = [line for line in lines if "third-party notice (hidden)" in line]
    assert all(line.startswith("DEBUG megatron_sft:") for line in hidden), hidden
    for notice in ["GPTModel IS DEPRECATED", "Apex is not installed", "MCore's async save is deprecated",
                   "torch.distributed is disabled"]:
        assert sum(notice in line for line in hidden) == 1, (notice, hidden)
    for notice in NOTICES:  # nowhere but in those DEBUG lines: not as warnings, not via Megatron's logger
        assert not [line for line in lines if notice in line and line not in hidden], notice
    assert "UserWarning: a real warning from user code" in proc.stderr
