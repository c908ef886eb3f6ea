"""Selective recompute limited to the first N layers (``training.recompute_num_layers`` with
``recompute_granularity: selective``): those layers run their MLP again in backward, the others
do not, and loss and gradients stay the same. Counted in fresh processes (Megatron's parallel
state) on a 3-layer model: calls of each layer's MLP over one forward and backward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.integration.trainer_helpers import REPO, free_port

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import megatron_sft.mcore  # noqa: F401
    from megatron_sft.config import ModelConfig, ParallelConfig
    from megatron_sft.model import build
    from megatron_sft.runtime import initialize_distributed, setup_model_parallel, teardown_model_parallel

    initialize_distributed()
    setup_model_parallel(ParallelConfig())
    cfg = ModelConfig(num_layers=3, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, vocab_size=64,
                      max_position_embeddings=64)
    limit = None if sys.argv[1] == "all" else int(sys.argv[1])
    config = build.transformer_config_from(cfg, ParallelConfig(), recompute_granularity="selective",
                                           overrides={"recompute_modules": ["mlp"]})
    model = build.build_gpt_model(cfg, ParallelConfig(), backend="torch", transformer_config=config, init_seed=1)
    if limit is not None:
        build.limit_selective_recompute(model, limit)
    calls = [0] * cfg.num_layers
    for i, layer in enumerate(model.decoder.layers):
        layer.mlp.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).unsqueeze(0)
    loss = model(tokens, positions, None, labels=tokens).sum()
    loss.backward()
    grad = sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None)
    teardown_model_parallel()
    print(json.dumps({"calls": calls, "loss": float(loss), "grad": grad}))
""")


def _run(limit: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, limit], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_only_the_first_layers_recompute_and_the_numbers_stay():
    results = {limit: _run(limit) for limit in ("all", "1", "0")}
    assert [results[k]["calls"] for k in ("all", "1", "0")] == [[2, 2, 2], [2, 1, 1], [1, 1, 1]]
    for limit in ("1", "0"):
        assert results[limit]["loss"] == results["all"]["loss"]
        assert results[limit]["grad"] == pytest.approx(results["all"]["grad"], rel=1e-12)
