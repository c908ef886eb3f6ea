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
    assert "model.vocab_size=" in joined and "choose a TP size that divides the embedding rows" in joined
    assert len(issues) == 8


@pytest.mark.parametrize("overrides, fragment", [
    (["--parallel.sequence_parallel=true"], "sequence_parallel=true needs parallel.tensor_model_parallel_size >= 2"),
    (["--parallel.context_parallel_size=3", "--model.attention_backend=te"], "data.seq_length=512 is not divisible by 2 x context_parallel_size"),
    (["--data.seq_length=2048"], "exceeds model.max_position_embeddings=1024"),
    (["--parallel.virtual_pipeline_model_parallel_size=2"], "needs parallel.pipeline_model_parallel_size >= 2"),
    (["--training.min_lr=1"], "training.min_lr=1.0 exceeds training.lr"),
    (["--training.lr_warmup_steps=11"], "lr_warmup_steps=11 must be <= the decay steps (10)"),
    (["--training.recompute_granularity=full"], "needs training.recompute_method"),
    (["--training.recompute_num_layers=2"], "recompute_num_layers applies to full or selective recompute"),
    (["--training.recompute_method=uniform"], "recompute_method only applies to full recompute"),
    (["--training.recompute_granularity=selective", "--training.recompute_num_layers=-1"],
     "recompute_num_layers=-1: must be >= 0"),
    (["--training.recompute_modules=[mlp]"], "recompute_modules only applies to selective"),
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
                      world_size=2, has_cuda=True, has_te=True)
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
                                  "qwen2.5_7b_128k.yaml", "llama3.1_8b_128k.yaml", "llama3.2_1b_16k.yaml",
                                  "llama3.2_1b_128k.yaml"])
def test_shipped_yaml_configs_load(name):
    path = REPO / "yaml_configs" / name
    raw = yaml.safe_load(path.read_text())
    world = raw.get("_world_size_hint", None)
    gpu = name != "tiny_cpu.yaml"
    p = raw.get("parallel", {})
    model_parallel = p.get("tensor_model_parallel_size", 1) * p.get("pipeline_model_parallel_size", 1) * \
        p.get("context_parallel_size", 1)
    one_gpu = name.startswith("llama3.2_1b")  # the one-GPU benchmark shapes
    cfg = load_config(str(path), world_size=1 if one_gpu or not gpu else max(8, model_parallel), has_cuda=gpu, has_te=gpu)
    assert config_to_dict(cfg)["model"]["num_layers"] >= 1


def test_fp8_needs_gpu_te_and_bf16(tmp_path):
    issues = issues_of(tmp_path, ["--training.fp8=tensorwise"])
    assert any("training.fp8='tensorwise' needs a GPU" in i and "bf16=False" in i for i in issues), issues
    issues = issues_of(tmp_path, ["--training.fp8=delayed", "--training.bf16=true", "--model.attention_backend=torch"],
                       has_cuda=True)
    assert any("training.fp8='delayed'" in i and "attention_backend='torch'" in i for i in issues), issues
    cfg = load_config(write(tmp_path), ["--training.fp8=blockwise", "--training.bf16=true"], has_cuda=True, has_te=True)
    assert cfg.training.fp8 == "blockwise"
    assert "training.fp8" in " ".join(issues_of(tmp_path, ["--training.fp8=e5m2"]))  # not a recipe


def test_te_activation_kernel_needs_the_te_backend(tmp_path):
    issues = issues_of(tmp_path, ["--training.activation_kernel=te"])  # no GPU: torch backend
    assert any("training.activation_kernel='te' needs the te attention backend" in i for i in issues), issues
    cfg = load_config(write(tmp_path), ["--training.activation_kernel=te"], has_cuda=True, has_te=True)
    assert cfg.training.activation_kernel == "te"
    assert load_config(write(tmp_path)).training.activation_kernel == "auto"


def test_lm_head_options(tmp_path):
    cfg = load_config(write(tmp_path))
    assert cfg.training.lm_head == "supervised" and cfg.training.lm_head_chunk_tokens == 4096
    assert any("lm_head_chunk_tokens=0" in i for i in issues_of(tmp_path, ["--training.lm_head_chunk_tokens=0"]))
    assert any("training.lm_head" in i for i in issues_of(tmp_path, ["--training.lm_head=sparse"]))


# ------------------------------------------------------------------ layered files (--config A --config B)

OVERLAY = textwrap.dedent("""
    training:
      lr: 3.0e-4
      clip_grad: 1.0
    data:
      train_prefix: [/data/a, /data/b]
      valid_prefix: null
    """)


def test_later_files_override_key_by_key_then_the_command_line(tmp_path):
    base, overlay = write(tmp_path), write(tmp_path, OVERLAY, "overlay.yaml")
    cfg = load_config([base, overlay], ["--training.clip_grad=0.5"])
    assert cfg.training.lr == pytest.approx(3e-4)          # from the overlay
    assert cfg.training.train_steps == 10                   # the base's training keys survive the merge
    assert cfg.training.clip_grad == 0.5                    # the command line comes last
    assert cfg.data.train_prefix == ["/data/a", "/data/b"]  # a list is replaced whole
    assert cfg.data.valid_prefix is None and cfg.data.seq_length == 512  # null replaces, siblings stay
    assert load_config([overlay, base]).training.clip_grad == 0.0  # order matters: the base given last wins
    assert load_config(base).training.lr == load_config([base]).training.lr  # one path as before


def test_unknown_keys_in_any_file_name_the_file_and_dotted_path(tmp_path):
    base = write(tmp_path, BASE + "  lrr: 1\n")
    overlay = write(tmp_path, "model:\n  rope_scaling:\n    factr: 2\nloging:\n  dir: x\n", "overlay.yaml")
    issues = issues_of_paths([base, overlay], ["--data.sed=3"])
    assert f"{base}: unknown key 'training.lrr'; did you mean 'training.lr'?" in issues
    assert f"{overlay}: unknown key 'model.rope_scaling.factr'; did you mean 'model.rope_scaling.factor'?" in issues
    assert f"{overlay}: unknown key 'loging'; did you mean 'logging'?" in issues
    assert "the command line: unknown key 'data.sed'; did you mean 'data.seed'?" in issues
    assert len(issues) == 4


def test_every_unreadable_file_is_reported(tmp_path):
    bad = write(tmp_path, "training: [1, 2", "bad.yaml")
    listed = write(tmp_path, "- a\n- b\n", "list.yaml")
    issues = issues_of_paths([write(tmp_path), bad, str(tmp_path / "missing.yaml"), listed])
    assert len(issues) == 3 and any(i.startswith(f"cannot read config file {bad}") for i in issues)
    assert any("missing.yaml" in i for i in issues) and f"{listed}: top level must be a mapping" in issues[2]


def issues_of_paths(paths, overrides=(), **kwargs):
    with pytest.raises(ConfigError) as err:
        load_config(paths, overrides, **kwargs)
    return err.value.issues


# ------------------------------------------------------------------ model section from checkpoint.pretrained

RECIPE = BASE[BASE.index("data:"):]  # data + training only, like yaml_configs/recipes/
CONVERTED_MODEL = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, vocab_size=512,
                       num_query_groups=2, max_position_embeddings=1024, rotary_base=1000000.0, norm_epsilon=1e-6,
                       add_qkv_bias=True, untie_embeddings_and_output_weights=False, attention_backend="auto")


def converted_dir(tmp_path, model=None, name="converted") -> Path:
    """A directory shaped like tools/convert_hf_to_megatron.py output (config.yaml next to the
    dist checkpoint), with every ModelConfig field written as the converter does."""
    from megatron_sft.config import ModelConfig

    out = tmp_path / name
    out.mkdir()
    section = dataclasses.asdict(ModelConfig(**(model or CONVERTED_MODEL)))
    (out / "config.yaml").write_text("# Converted from ...\n" + yaml.safe_dump({"model": section}, sort_keys=False))
    (out / "metadata.json").write_text("{}")
    return out


def test_recipe_without_model_takes_it_from_the_converted_checkpoint(tmp_path):
    assert "model:" not in RECIPE
    ckpt = converted_dir(tmp_path)
    cfg = load_config(write(tmp_path, RECIPE), [f"--checkpoint.pretrained={ckpt}"])
    assert cfg.model.num_layers == 2 and cfg.model.add_qkv_bias and not cfg.model.untie_embeddings_and_output_weights
    assert cfg.model.rotary_base == 1e6 and cfg.model.attention_backend == "auto"
    # Also when pretrained is set in a file, and from a trainer save dir (its latest iteration's config.yaml).
    save = tmp_path / "save"
    (save / "iter_0000003").mkdir(parents=True)
    (save / "iter_0000003" / "config.yaml").write_text(
        yaml.safe_dump({"model": {**CONVERTED_MODEL, "num_layers": 6}, "data": {"seq_length": 1}}))
    (save / "latest_checkpointed_iteration.txt").write_text("3\n")
    cfg = load_config([write(tmp_path, RECIPE), write(tmp_path, f"checkpoint:\n  pretrained: {save}\n", "p.yaml")])
    assert cfg.model.num_layers == 6 and cfg.data.seq_length == 512  # only the model section is taken


def test_explicit_model_values_equal_to_the_checkpoint_are_fine(tmp_path):
    ckpt = converted_dir(tmp_path)
    # Same values, written differently: ints for floats, a float string PyYAML leaves unparsed.
    text = RECIPE + "model:\n  num_layers: 2\n  rotary_base: 1000000\n  norm_epsilon: 1e-6\n  add_qkv_bias: true\n"
    cfg = load_config(write(tmp_path, text), [f"--checkpoint.pretrained={ckpt}", "--model.hidden_size=64"])
    assert cfg.model.hidden_size == 64 and cfg.model.norm_epsilon == 1e-6


def test_every_conflicting_model_value_is_reported_with_both_values_and_the_fix(tmp_path):
    ckpt = converted_dir(tmp_path)
    base = write(tmp_path, BASE)  # a full model section of another model (4 layers, untied, no bias)
    overlay = write(tmp_path, "model:\n  norm_epsilon: 1.0e-5\n  num_layers: 8\n", "overlay.yaml")
    issues = issues_of_paths([base, overlay], [f"--checkpoint.pretrained={ckpt}", "--model.rope_scaling.factor=4"])
    text = "\n".join(issues)
    assert f"model.num_layers=8 ({overlay}) conflicts with 2 in {ckpt}/config.yaml" in text  # the last setter named
    assert f"remove model.num_layers from {overlay}" in text
    assert f"model.norm_epsilon=1e-05 ({overlay}) conflicts with 1e-06" in text
    assert f"model.num_layers=4" not in text
    assert "model.rope_scaling={'rope_type': 'llama3', 'factor': 4.0" in text and "(the command line)" in text
    assert "conflicts with None" in text
    # hidden_size, ffn_hidden_size, heads, groups, vocab are equal in BASE; max_position_embeddings is a
    # run choice; untie_embeddings_and_output_weights differs only as a default BASE never states.
    keys = sorted(i.split("=")[0] for i in issues)
    assert keys == ["model.norm_epsilon", "model.num_layers", "model.rope_scaling"]


def test_run_choices_may_differ_from_the_checkpoint(tmp_path):
    ckpt = converted_dir(tmp_path)
    cfg = load_config(write(tmp_path, RECIPE), [f"--checkpoint.pretrained={ckpt}", "--model.attention_backend=torch",
                                                "--model.max_position_embeddings=4096"])
    assert cfg.model.attention_backend == "torch" and cfg.model.max_position_embeddings == 4096


def test_model_null_in_an_overlay_hands_the_model_to_the_checkpoint(tmp_path):
    ckpt = converted_dir(tmp_path)
    overlay = write(tmp_path, "model: null\n", "o.yaml")
    cfg = load_config([write(tmp_path), overlay], [f"--checkpoint.pretrained={ckpt}"])
    assert cfg.model.num_layers == 2


def test_a_full_model_section_without_a_usable_pretrained_dir_keeps_working(tmp_path):
    # Resume runs and configs written before conversion existed: pretrained only matters for weights.
    cfg = load_config(write(tmp_path), [f"--checkpoint.pretrained={tmp_path / 'not_yet'}"])
    assert cfg.model.num_layers == 4


@pytest.mark.parametrize("case, fragment", [
    ("none", "no model section: give model: in a --config file, or --checkpoint.pretrained=DIR"),
    ("missing", "does not exist, so it cannot give the model section"),
    ("no_yaml", "holds no config.yaml, so it cannot give the model section"),
    ("no_section", "has no model: section: re-convert the model, or give model:"),
    ("unknown_key", "config.yaml: unknown key 'model.hiden_size'; did you mean 'model.hidden_size'?"),
    ("bad_type", "'model.num_layers' = 'two': expected int"),
])
def test_model_section_errors(tmp_path, case, fragment):
    pretrained = {"none": None, "missing": tmp_path / "missing"}.get(case, tmp_path / "ckpt")
    if case != "none" and case != "missing":
        (tmp_path / "ckpt").mkdir()
        content = {"no_section": {"data": {}}, "unknown_key": {"model": {**CONVERTED_MODEL, "hiden_size": 3}},
                   "bad_type": {"model": {**CONVERTED_MODEL, "num_layers": "two"}}}.get(case)
        if content is not None:
            (tmp_path / "ckpt" / "config.yaml").write_text(yaml.safe_dump(content))
    overrides = [f"--checkpoint.pretrained={pretrained}"] if pretrained else []
    issues = issues_of_paths([write(tmp_path, RECIPE)], overrides + ["--training.micro_batch_size=two"])
    assert any(fragment in i for i in issues), issues
    assert "'training.micro_batch_size' = 'two': expected int" in issues  # reported in the same pass
    assert not any(i.startswith("missing required key 'model.") for i in issues), issues  # one issue, not five


RECIPES = REPO / "yaml_configs" / "recipes"


@pytest.mark.parametrize("files, world_size, has_cuda", [
    (["sft_converted_1gpu.yaml"], 1, True),
    (["sft_converted_8gpu.yaml"], 8, True),
    (["sft_converted_1gpu.yaml", "cpu.yaml"], 1, False),
    (["sft_converted_8gpu.yaml", "cpu.yaml"], 2, False),
])
def test_shipped_recipes_load_with_a_converted_model(tmp_path, files, world_size, has_cuda):
    ckpt = converted_dir(tmp_path, {**CONVERTED_MODEL, "max_position_embeddings": 32768})
    for name in files:
        assert "model" not in yaml.safe_load((RECIPES / name).read_text()) or name == "cpu.yaml"
    overrides = [f"--checkpoint.pretrained={ckpt}"] + (["--training.global_batch_size=4"] if world_size == 2 else [])
    cfg = load_config([str(RECIPES / n) for n in files], overrides, world_size=world_size, has_cuda=has_cuda)
    assert cfg.model.num_layers == 2 and cfg.checkpoint.pretrained == str(ckpt)
    assert cfg.training.bf16 == has_cuda


def test_pretrain_sft_layers_configs_and_documents_the_order(tmp_path, monkeypatch, capsys):
    import pretrain_sft

    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    overlay = write(tmp_path, "training:\n  lrr: 1\n", "overlay.yaml")
    assert pretrain_sft.main(["--config", write(tmp_path), "--config", overlay]) == 2
    assert f"{overlay}: unknown key 'training.lrr'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain_sft.main(["--help"])
    out = capsys.readouterr().out
    assert "each ``--config`` file in the order given, then the ``--section.key=value`` overrides" in out
    assert "--checkpoint.pretrained" in out


@pytest.mark.parametrize("name, has_cuda, has_te, expected", [
    ("auto", True, True, "te"), ("auto", True, False, "torch"), ("auto", False, True, "torch"),
    ("torch", True, True, "torch"), ("te", True, True, "te"),
    ("te", True, False, "transformer_engine does not import"), ("te", False, False, "no GPU here"),
    ("flash", True, True, "use one of auto, te, torch"),
])
def test_one_attention_backend_rule(name, has_cuda, has_te, expected):
    from megatron_sft.config import resolve_attention_backend

    if expected in ("te", "torch"):
        assert resolve_attention_backend(name, has_cuda=has_cuda, has_te=has_te) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            resolve_attention_backend(name, has_cuda=has_cuda, has_te=has_te)


def test_context_parallel_on_a_gpu_without_transformer_engine_is_reported(tmp_path):
    overrides = ["--parallel.context_parallel_size=2", "--training.bf16=true"]
    issues = issues_of(tmp_path, overrides, world_size=2, has_cuda=True, has_te=False)
    assert any("context_parallel_size=2 needs the te attention backend" in i and "no Transformer Engine here" in i
               for i in issues), issues
    load_config(write(tmp_path), overrides, world_size=2, has_cuda=True, has_te=True)  # no issue with TE


def test_interleaved_pipeline_needs_micro_batches_in_groups_of_pp(tmp_path):
    layout = ["--parallel.pipeline_model_parallel_size=2", "--parallel.virtual_pipeline_model_parallel_size=2",
              "--training.micro_batch_size=1"]
    issues = issues_of(tmp_path, layout + ["--training.global_batch_size=3"], world_size=2, has_cuda=False)
    assert any("gives 3 micro-batches per data-parallel rank" in i and "multiple of 2" in i for i in issues), issues
    cfg = load_config(write(tmp_path), layout + ["--training.global_batch_size=4"], world_size=2, has_cuda=False)
    assert cfg.training.global_batch_size == 4


def test_load_section_merges_layers_in_order_and_names_each_source():
    from megatron_sft.config import load_section
    from megatron_sft.data.compile_settings import CompileConfig
    from megatron_sft.data.formats import FormatKeys

    base = {"inputs": ["a"], "tokenizer": "t", "output_prefix": "o", "seq_length": 8,
            "format_keys": {"messages": "history", "role_map": {"human": "user", "bot": "assistant"}}}
    config = load_section(CompileConfig, [("base.yaml", base), ("over.yaml", {"format_keys": {"tools": "fns"}}),
                                          ("--limit", {"limit": 3})])
    assert config.format_keys == FormatKeys(messages="history", tools="fns",
                                            role_map=(("bot", "assistant"), ("human", "user")))
    assert config.limit == 3 and config.seq_length == 8  # ``int | None`` (PEP 604) converts like Optional

    layers = [("base.yaml", {**base, "limit": "x"}), ("over.yaml", {"sed": 1, "format_keys": {"role_map": {"a": "b"}}}),
              ("--seq-length", {"seq_length": "abc"})]
    with pytest.raises(ConfigError) as err:
        load_section(CompileConfig, layers, fixes={"tokenizer": "pass --tokenizer"})
    assert err.value.issues == [
        "over.yaml: unknown key 'sed'; did you mean 'seed'?",
        "--seq-length: 'seq_length' = 'abc': expected int",
        "format_keys: role_map targets must be one of ('system', 'user', 'assistant', 'tool', 'tool_call'); got a->b",
        "base.yaml: 'limit' = 'x': expected int or null",
    ]
    with pytest.raises(ConfigError) as err:
        load_section(CompileConfig, [("f.yaml", {"inputs": "a", "format_keys": {"role_map": 3}})],
                     fixes={"tokenizer": "pass --tokenizer"})
    issues = err.value.issues
    assert issues[0] == "f.yaml: 'inputs' = 'a': expected a list of str"
    assert issues[1].startswith("missing required key 'tokenizer'") and issues[1].endswith(": pass --tokenizer")
    assert "f.yaml: 'format_keys.role_map' = 3: expected a list of a list (str, str)" in issues
