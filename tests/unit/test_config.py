"""The config tree: strict YAML + CLI loading, every issue reported at once with its fix."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml

from megatron_sft.config import (ConfigError, SFTConfig, config_help, config_to_dict, field_docs, load_config)

REPO = Path(__file__).resolve().parents[2]

BASE = textwrap.dedent("""
    model:
      num_layers: 4
      hidden_size: 64
      ffn_hidden_size: 128
      num_attention_heads: 4
      num_query_groups: 2
      vocab_size: 512
      max_position_embeddings: 1024
    data:
      train_prefix: /data/train
      valid_prefix: /data/valid
      seq_length: 512
    training:
      global_batch_size: 8
      train_steps: 10
      clip_grad: 0.0
    """)


def write(tmp_path, text=BASE, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def issues_of(tmp_path, overrides=(), text=BASE, **kwargs):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides, **kwargs)
    return err.value.issues


def test_minimal_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path))
    assert isinstance(cfg, SFTConfig)
    assert cfg.training.micro_batch_size == 1 and cfg.training.loss_normalization == "token"
    assert cfg.parallel.tensor_model_parallel_size == 1 and cfg.checkpoint.save is None


def test_cli_overrides_go_through_the_same_loader(tmp_path):
    cfg = load_config(write(tmp_path), ["--training.lr=3e-4", "--data.train_prefix", "[/a, /b]",
                                        "--training.bf16=false", "--model.rope_scaling.factor=4"])
    assert cfg.training.lr == pytest.approx(3e-4)
    assert cfg.data.train_prefix == ["/a", "/b"]
    assert cfg.model.rope_scaling.factor == 4.0 and cfg.model.rope_scaling.rope_type == "llama3"


def test_yaml_float_without_dot_is_accepted(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "  lr: 1e-5\n"))
    assert cfg.training.lr == pytest.approx(1e-5)


def test_unknown_keys_name_the_dotted_path_and_suggest(tmp_path):
    issues = issues_of(tmp_path, ["--training.lrr=1", "--nosection.x=1", "--model.hiden_size=3"])
    text = "\n".join(issues)
    assert "unknown key 'training.lrr'; did you mean 'training.lr'?" in text
    assert "unknown key 'nosection'" in text
    assert "unknown key 'model.hiden_size'; did you mean 'model.hidden_size'?" in text
    assert len(issues) == 3


def test_type_errors_and_missing_required_all_at_once(tmp_path):
    text = BASE.replace("  train_steps: 10\n", "") + "  micro_batch_size: two\n  lr_decay_style: exp\n"
    issues = issues_of(tmp_path, ["--parallel.sequence_parallel=3"], text=text)
    joined = "\n".join(issues)
    assert "missing required key 'training.train_steps'" in joined
    assert "'training.micro_batch_size' = 'two': expected int" in joined
    assert "'training.lr_decay_style' = 'exp': expected one of 'cosine', 'linear', 'constant'" in joined
    assert "'parallel.sequence_parallel' = 3: expected bool" in joined
    assert len(issues) == 4


def test_bad_combinations_all_reported_with_key_value_and_fix(tmp_path):
    overrides = ["--parallel.tensor_model_parallel_size=3",        # heads 4, groups 2 vs TP 3
                 "--parallel.pipeline_model_parallel_size=3",      # 4 layers vs PP 3
                 "--parallel.context_parallel_size=2",             # CP without te backend; 512 % 4 ok
                 "--parallel.use_distributed_optimizer=true",     # CPU
                 "--training.bf16=true",                           # CPU
                 "--training.global_batch_size=7"]
    issues = issues_of(tmp_path, overrides, world_size=36, has_cuda=False)
    joined = "\n".join(issues)
    assert "model.num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=3" in joined
    assert "model.num_query_groups=2 is not divisible" in joined
    assert "model.num_layers=4 is not divisible by pipeline stages" in joined
    assert "parallel.context_parallel_size=2 needs the te attention backend" in joined
    assert "parallel.use_distributed_optimizer=true is not supported on CPU: set --parallel.use_distributed_optimizer=false" in joined
    assert "training.bf16=true is not supported on CPU" in joined
    assert "training.global_batch_size=7 is not divisible by micro_batch_size x data-parallel size = 1 x 2" in joined
    assert len(issues) == 7


@pytest.mark.parametrize("overrides, fragment", [
    (["--parallel.sequence_parallel=true"], "sequence_parallel=true needs parallel.tensor_model_parallel_size >= 2"),
    (["--parallel.context_parallel_size=3", "--model.attention_backend=te"], "data.seq_length=512 is not divisible by 2 x context_parallel_size"),
    (["--data.seq_length=2048"], "exceeds model.max_position_embeddings=1024"),
    (["--parallel.virtual_pipeline_model_parallel_size=2"], "needs parallel.pipeline_model_parallel_size >= 2"),
    (["--training.min_lr=1"], "training.min_lr=1.0 exceeds training.lr"),
    (["--training.lr_warmup_steps=11"], "lr_warmup_steps=11 must be <= the decay steps (10)"),
    (["--training.recompute_granularity=full"], "needs training.recompute_method"),
    (["--training.recompute_num_layers=2"], "only apply to full recompute"),
    (["--checkpoint.save_interval_steps=5"], "needs checkpoint.save"),
    (["--data.valid_prefix=null", "--training.eval_interval_steps=5"], "needs data.valid_prefix"),
    (["--data.train_weights=[1, 2]"], "data.train_weights has 2 entries for 1 train prefixes"),
    (["--training.micro_batch_size=0"], "training.micro_batch_size=0: must be >= 1"),
    (["--model.attention_backend=flash"], "model.attention_backend='flash'"),
    (["--parallel.context_parallel_size=3", "--model.attention_backend=te", "--parallel.context_parallel_comm_type=a2a"],
     "context_parallel_comm_type='a2a' splits the 4 attention heads per TP rank over context_parallel_size=3"),
    (["--parallel.context_parallel_comm_type=ring"], "parallel.context_parallel_comm_type"),
])
def test_each_combination_check(tmp_path, overrides, fragment):
    issues = issues_of(tmp_path, overrides, world_size=1, has_cuda=False)
    assert any(fragment in issue for issue in issues), issues


def test_world_size_not_divisible(tmp_path):
    issues = issues_of(tmp_path, ["--parallel.tensor_model_parallel_size=2"], world_size=3)
    assert any("world size 3 is not divisible by TP x PP x CP" in i for i in issues)


def test_gpu_only_options_pass_with_cuda(tmp_path):
    cfg = load_config(write(tmp_path), ["--training.bf16=true", "--parallel.use_distributed_optimizer=true",
                                        "--model.attention_backend=te", "--parallel.context_parallel_size=2"],
                      world_size=2, has_cuda=True)
    assert cfg.training.bf16 and cfg.parallel.context_parallel_size == 2


def test_malformed_override_and_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        load_config(write(tmp_path), ["training.lr=1"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_every_field_has_a_docstring_and_help_lists_it():
    help_text = config_help()
    stack = [SFTConfig]
    while stack:
        cls = stack.pop()
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
        for f in dataclasses.fields(cls):
            import typing
            hint = typing.get_type_hints(cls)[f.name]
            for candidate in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(candidate):
                    stack.append(candidate)
    assert "--training.loss_normalization" in help_text and "--checkpoint.save_interval_steps" in help_text


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "small_gpu.yaml", "llama3.1_8b_32k.yaml", "qwen2.5_7b_32k.yaml",
                                  "qwen2.5_7b_128k.yaml", "llama3.1_8b_128k.yaml"])
def test_shipped_yaml_configs_load(name):
    path = REPO / "yaml_configs" / name
    raw = yaml.safe_load(path.read_text())
    world = raw.get("_world_size_hint", None)
    gpu = name != "tiny_cpu.yaml"
    p = raw.get("parallel", {})
    model_parallel = p.get("tensor_model_parallel_size", 1) * p.get("pipeline_model_parallel_size", 1) * \
        p.get("context_parallel_size", 1)
    cfg = load_config(str(path), world_size=max(8, model_parallel) if gpu else 1, has_cuda=gpu)
    assert config_to_dict(cfg)["model"]["num_layers"] >= 1


def test_fp8_needs_gpu_te_and_bf16(tmp_path):
    issues = issues_of(tmp_path, ["--training.fp8=tensorwise"])
    assert any("training.fp8='tensorwise' needs a GPU" in i and "bf16=False" in i for i in issues), issues
    issues = issues_of(tmp_path, ["--training.fp8=delayed", "--training.bf16=true", "--model.attention_backend=torch"],
                       has_cuda=True)
    assert any("training.fp8='delayed'" in i and "attention_backend='torch'" in i for i in issues), issues
    cfg = load_config(write(tmp_path), ["--training.fp8=blockwise", "--training.bf16=true"], has_cuda=True)
    assert cfg.training.fp8 == "blockwise"
    assert "training.fp8" in " ".join(issues_of(tmp_path, ["--training.fp8=e5m2"]))  # not a recipe


def test_lm_head_options(tmp_path):
    cfg = load_config(write(tmp_path))
    assert cfg.training.lm_head == "supervised" and cfg.training.lm_head_chunk_tokens == 4096
    assert any("lm_head_chunk_tokens=0" in i for i in issues_of(tmp_path, ["--training.lm_head_chunk_tokens=0"]))
    assert any("training.lm_head" in i for i in issues_of(tmp_path, ["--training.lm_head=sparse"]))
