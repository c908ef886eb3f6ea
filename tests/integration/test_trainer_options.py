"""Options that must not change the numbers (data-loader workers, activation recompute, the LM
head over every position or in small chunks) and
those that change what is reported (mixtures with weights, per-source losses, loss modes)."""

from __future__ import annotations

import pytest

from tests.integration.trainer_helpers import conversations, metrics, run, train_records, write_config, write_packed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    train = write_packed(root / "train", conversations(24, seed=0), seq_length=256)
    other = write_packed(root / "other", conversations(6, seed=9), seq_length=256, input_names=("tools.jsonl",))
    config = write_config(root / "c.yaml", data={"train_prefix": train}, training={"train_steps": 3})
    run(config, f"--logging.dir={root / 'ref'}")
    return root, config, train, other, train_records(root / "ref")


def losses(records):
    """Flat [step, loss, grad_norm, step, ...]: pytest.approx compares flat sequences only."""
    return [float(value) for r in records for value in (r["step"], r["loss"], r["grad_norm"])]


@pytest.mark.parametrize("option", [
    ["--data.num_workers=2"],
    ["--training.recompute_granularity=full", "--training.recompute_method=uniform",
     "--training.recompute_num_layers=1"],
    ["--training.recompute_granularity=selective"],
    ["--training.recompute_granularity=selective", "--training.recompute_modules=[mlp]"],
    ["--training.recompute_granularity=selective", "--training.recompute_modules=[mlp]",
     "--training.recompute_num_layers=1"],  # the first layer of the stage only
    ["--training.lm_head=full"],  # the reference runs the default: supervised positions only, chunked
    ["--training.lm_head_chunk_tokens=5"],
], ids=["workers", "full_recompute", "selective_recompute", "mlp_recompute", "mlp_recompute_first_layer",
        "full_lm_head", "small_lm_head_chunks"])
def test_option_keeps_the_numbers(setup, option):
    root, config, _, _, reference = setup
    name = "_".join(o.split(".")[-1] for o in option).translate(str.maketrans("=[],", "____"))
    run(config, *option, f"--logging.dir={root / name}")
    assert losses(train_records(root / name)) == pytest.approx(losses(reference), rel=1e-6)


def test_weighted_mixture_reports_each_source(setup, tmp_path):
    root, config, train, other, _ = setup
    run(config, f"--data.train_prefix=[{train}, {other}]", "--data.train_weights=[1, 3]",
        f"--data.valid_prefix=[{train}, {other}]", "--training.eval_interval_steps=3",
        f"--logging.dir={tmp_path}")
    records = metrics(tmp_path)
    seen = {key for r in records for key in r if key.startswith("loss/")}
    assert seen == {"loss/synthetic", "loss/tools"}
    evals = [r for r in records if "eval_loss" in r]
    assert {"eval_loss/synthetic", "eval_loss/tools"} <= set(evals[-1])


@pytest.mark.parametrize("mode", ["turn", "sequence"])
def test_loss_modes_train_and_report_counts(setup, tmp_path, mode):
    root, config, *_ = setup
    run(config, f"--training.loss_normalization={mode}", f"--logging.dir={tmp_path}")
    records = train_records(tmp_path)
    assert all(r["loss"] > 0 and r["supervised_tokens"] > 0 for r in records)


def test_validation_sources_differ_from_training_sources(setup, tmp_path):
    root, config, train, other, _ = setup
    proc = run(config, f"--data.valid_prefix=[{train}, {other}]", "--training.eval_interval_steps=2",
               f"--logging.dir={tmp_path}")
    evals = [r for r in metrics(tmp_path) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 3]
    assert {"eval_loss/synthetic", "eval_loss/tools"} <= set(evals[0])
