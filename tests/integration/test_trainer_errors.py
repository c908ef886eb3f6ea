"""Every bad input ends in a clear message and a non-zero exit, never a hang: config errors
(exit 2, all at once), missing/corrupt data, datasets of different tokenizers, tokenizer vocab above the model's, packs longer
than seq_length, non-finite losses (skipped steps logged with their step number, then an error)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration.trainer_helpers import conversations, run, train_records, write_config, write_packed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    return write_packed(root / "train", conversations(16, seed=0), seq_length=256)


def failing(config, *args, code=1, nproc=1):
    proc = run(config, *args, check=False, timeout=180, nproc=nproc)
    assert proc.returncode == code if nproc == 1 else proc.returncode != 0, (proc.returncode, proc.stderr[-3000:])
    return proc.stderr


def test_config_errors_exit_2_listing_every_issue(train, tmp_path):
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": train})
    stderr = failing(config, "--training.lrr=1", "--parallel.tensor_model_parallel_size=3",
                     "--training.micro_batch_size=x", code=2)
    assert "unknown key 'training.lrr'; did you mean 'training.lr'?" in stderr
    assert "'training.micro_batch_size' = 'x': expected int" in stderr
    assert "invalid configuration (2 issue(s))" in stderr  # type errors first; combinations after


def test_bad_combinations_exit_2_at_start_up(train, tmp_path):
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": train})
    stderr = failing(config, "--parallel.tensor_model_parallel_size=3", "--parallel.sequence_parallel=true",
                     "--training.bf16=true", "--training.global_batch_size=3", code=2)
    for fragment in ("num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=3",
                     "world size 1 is not divisible", "training.bf16=true is not supported on CPU"):
        assert fragment in stderr


def test_missing_dataset_file(train, tmp_path):
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": str(tmp_path / "nope")})
    assert "missing file" in failing(config)


def test_corrupt_dataset_file(train, tmp_path):
    prefix = write_packed(tmp_path / "bad", conversations(16, seed=0), seq_length=256)
    with open(prefix + "_tokens.bin", "r+b") as f:
        f.truncate(100)
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": prefix})
    assert "bytes, its index describes" in failing(config)


def test_flipped_pointer_and_other_tokenizer_stop_before_step_1(train, tmp_path):
    """Issue 8 class 5 through the trainer: a one-bit flip in a sequence pointer (which used to
    shift a pack by a token silently) and a valid set made with another tokenizer."""
    prefix = write_packed(tmp_path / "flipped", conversations(16, seed=0), seq_length=256)
    with open(prefix + "_tokens.idx", "r+b") as f:
        f.seek(34 + 16 * 4 + 8)  # header, 16 int32 lengths, then pointer 1 (int64)
        low = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([low[0] ^ 0x04]))
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": prefix})
    stderr = failing(config)
    assert "flipped_tokens.idx: sequence pointer" in stderr and "at pack 0, conversation 1" in stderr
    assert "re-run tools/preprocess_data.py" in stderr

    other = write_packed(tmp_path / "other", conversations(8, seed=1), seq_length=256)
    meta = json.loads(Path(other + ".meta.json").read_text())
    meta.update(tokenizer="another/tokenizer", tokenizer_vocab_sha256="f" * 64)
    Path(other + ".meta.json").write_text(json.dumps(meta))
    config = write_config(tmp_path / "c2.yaml", data={"train_prefix": train, "valid_prefix": other})
    stderr = failing(config)
    assert "made with different tokenizers" in stderr and "another/tokenizer (vocab_size 128, vocab sha256 ffffffffffff)" in stderr


def test_tokenizer_vocab_larger_than_model(tmp_path):
    prefix = write_packed(tmp_path / "big_vocab", conversations(8, seed=0), seq_length=256, vocab_size=50000)
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": prefix})
    stderr = failing(config)
    assert "50000 tokens > model.vocab_size=128" in stderr and "raise model.vocab_size" in stderr


def test_packs_longer_than_seq_length(train, tmp_path):
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": train, "seq_length": 128})
    assert "packed for seq_length 256 > data.seq_length=128" in failing(config)


def test_pack_longer_than_its_meta_says(tmp_path):
    prefix = write_packed(tmp_path / "liar", conversations(16, seed=0), seq_length=256)
    meta_path = Path(prefix + ".meta.json")
    meta = json.loads(meta_path.read_text())
    meta["seq_length"] = 64
    meta_path.write_text(json.dumps(meta))
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": prefix, "seq_length": 64})
    assert "tokens > seq_length 64" in failing(config)


def test_non_finite_loss_is_an_error_naming_the_step(train, tmp_path):
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": train},
                          training={"train_steps": 20, "lr": 1e30, "lr_warmup_steps": 0, "clip_grad": 0.0})
    stderr = failing(config, f"--logging.dir={tmp_path / 'logs'}")
    assert "non-finite" in stderr and "training.max_skipped_steps=0" in stderr


def test_non_finite_steps_are_skipped_and_logged_until_the_limit(train, tmp_path):
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": train},
                          training={"train_steps": 20, "lr": 1e30, "lr_warmup_steps": 0, "clip_grad": 0.0,
                                    "max_skipped_steps": 2})
    stderr = failing(config, f"--logging.dir={tmp_path / 'logs'}")
    skipped = [line for line in stderr.splitlines() if "skipped: non-finite" in line]
    assert len(skipped) == 3 and "in a row" in skipped[0]
    assert "3 step(s) in a row" in stderr


def test_errors_in_a_two_process_run_do_not_hang(tmp_path):
    prefix = write_packed(tmp_path / "big_vocab", conversations(8, seed=0), seq_length=256, vocab_size=50000)
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": prefix})
    assert "model.vocab_size=128" in failing(config, nproc=2)


def test_eval_only_without_validation_data(train, tmp_path):
    config = write_config(tmp_path / "c.yaml", data={"train_prefix": train})
    assert "--eval-only needs data.valid_prefix" in failing(config, "--eval-only", code=2)
