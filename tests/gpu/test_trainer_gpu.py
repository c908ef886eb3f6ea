"""The trainer on one GPU (run on the GPU box; skipped without CUDA / Transformer Engine): the
``te`` and ``torch`` attention backends give the same losses on the same packed batches, from the
same initial checkpoint, within bf16 noise; the same holds for ``--eval-only``. (Packed vs alone
on the TE path: tests/gpu/test_model_gpu.py.)"""

from __future__ import annotations

import re

import pytest
import torch

from tests.integration.trainer_helpers import conversations, run, train_records, write_config, write_packed

pytestmark = pytest.mark.gpu


def _has_te() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401

        return True
    except Exception:
        return False


needs_te = pytest.mark.skipif(not torch.cuda.is_available() or not _has_te(),
                              reason="needs CUDA and Transformer Engine")

GPU_MODEL = {"num_layers": 4, "hidden_size": 256, "ffn_hidden_size": 704, "num_attention_heads": 8,
             "num_query_groups": 2, "max_position_embeddings": 4096}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_gpu")
    convs = conversations(96, seed=3, min_len=40, max_len=600)
    train = write_packed(root / "train", convs[:80], seq_length=2048)
    valid = write_packed(root / "valid", convs[80:], seq_length=2048)
    config = write_config(root / "c.yaml", model={**GPU_MODEL, "attention_backend": "te"},
                          data={"train_prefix": train, "valid_prefix": valid, "seq_length": 2048},
                          training={"bf16": True, "train_steps": 8, "global_batch_size": 4, "lr": 3e-4})
    run(config, "--training.train_steps=1", f"--checkpoint.save={root / 'init'}")
    return root, config


def _eval(config, *args) -> tuple:
    out = run(config, "--eval-only", *args).stdout.strip().splitlines()[-1]
    loss, tokens = re.fullmatch(r"eval_loss=(\S+) eval_tokens=(\d+)", out).groups()
    return float(loss), int(tokens)


@needs_te
def test_te_and_torch_backends_train_alike(setup):
    root, config = setup
    records = {}
    for backend in ("te", "torch"):
        run(config, f"--model.attention_backend={backend}", f"--checkpoint.pretrained={root / 'init'}",
            f"--logging.dir={root / backend}")
        records[backend] = train_records(root / backend)
    te, ref = records["te"], records["torch"]
    assert [r["supervised_tokens"] for r in te] == [r["supervised_tokens"] for r in ref]
    for a, b in zip(te, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2), (a, b)
    assert te[-1]["loss"] < te[0]["loss"]


@needs_te
def test_eval_only_te_vs_torch(setup):
    root, config = setup
    load = f"--checkpoint.load={root / 'init'}"
    te = _eval(config, load, "--model.attention_backend=te")
    ref = _eval(config, load, "--model.attention_backend=torch")
    assert te[1] == ref[1] > 0
    assert te[0] == pytest.approx(ref[0], rel=1e-2)


@needs_te
def test_te_swiglu_trains_like_megatrons(setup):
    """``training.activation_kernel: te`` (TE's SwiGLU op) against Megatron's fused SwiGLU: the
    same function, so the same losses to bf16 noise."""
    root, config = setup
    records = {}
    for kernel in ("megatron", "te"):
        run(config, "--model.attention_backend=te", f"--training.activation_kernel={kernel}",
            f"--checkpoint.pretrained={root / 'init'}", f"--logging.dir={root / ('swiglu_' + kernel)}")
        records[kernel] = train_records(root / ("swiglu_" + kernel))
    for a, b in zip(records["te"], records["megatron"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=5e-3), (a, b)
    assert len(records["te"]) == len(records["megatron"]) == 8
