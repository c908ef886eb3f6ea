"""The typed configuration tree of megatron-sft, mirrored by YAML and loaded strictly.

Every section is a dataclass; every field has a docstring (it doubles as ``--help``). Megatron's
own ``TransformerConfig`` is never re-declared here: it is built by one pure function
(``megatron_sft.model.build.transformer_config_from``) from these sections.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import os
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml

from megatron_sft.errors import InputError, SFTError
from megatron_sft.data.labels import LossMode


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling, as in HF ``rope_scaling`` (only ``llama3`` is supported)."""

    rope_type: str = "llama3"
    """Scaling type; ``llama3`` is the Llama-3.1 wavelength-dependent scaling."""
    factor: float = 8.0
    """Overall scaling factor."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """Context length the base model was pre-trained at."""


@dataclass
class ModelConfig:
    """A Llama-style decoder: RMSNorm, SwiGLU MLP, RoPE, GQA (Megatron names)."""

    num_layers: int
    """Number of transformer layers."""
    hidden_size: int
    """Model (residual stream) width."""
    ffn_hidden_size: int
    """Width of the SwiGLU MLP (per branch: gate and up are each this wide)."""
    num_attention_heads: int
    """Number of query heads."""
    vocab_size: int
    """Number of embedding rows; must be >= the tokenizer's vocabulary size."""
    num_query_groups: Optional[int] = None
    """Number of key/value heads (GQA); None means equal to num_attention_heads (MHA)."""
    kv_channels: Optional[int] = None
    """Per-head dimension; None means hidden_size // num_attention_heads."""
    max_position_embeddings: int = 4096
    """Longest sequence RoPE is prepared for. A run choice (no weight depends on it): may differ
    from the model section of ``checkpoint.pretrained``, e.g. to fine-tune at a longer context."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    rope_scaling: Optional[RopeScalingConfig] = None
    """Optional RoPE scaling (Llama-3.1 style)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    add_qkv_bias: bool = False
    """Bias on the query/key/value projections (Qwen2/2.5)."""
    qk_layernorm: bool = False
    """RMSNorm on each query and key head before RoPE (Qwen3)."""
    untie_embeddings_and_output_weights: bool = True
    """False ties the output projection to the input embedding (small Qwen/Llama-3.2 models)."""
    init_method_std: float = 0.02
    """Std of the normal init used when training starts from random weights."""
    attention_backend: str = "auto"
    """Core attention: ``te`` (Transformer Engine, THD, CP), ``torch`` (ours: varlen on CUDA,
    per-segment SDPA on CPU) or ``auto`` (``te`` when importable on a GPU, else ``torch``).
    A run choice: may differ from the model section of ``checkpoint.pretrained``."""

    @property
    def query_groups(self) -> int:
        """Key/value heads: ``num_query_groups``, or one per query head (MHA) when unset."""
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Per-head width: ``kv_channels``, or hidden_size // num_attention_heads when unset."""
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    """Model-parallel layout. Data parallel size is what remains of the world size."""

    tensor_model_parallel_size: int = 1
    """Tensor parallel degree (heads and query groups must divide by it)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages (num_layers must divide by it x virtual size)."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline stage (interleaved 1F1B); None disables. Micro-batches are then
    padded to one fixed length (the longest micro-batch the data can form)."""
    context_parallel_size: int = 1
    """Context parallel degree (TE backend only); each conversation is padded to 2*CP."""
    context_parallel_comm_type: Literal["p2p", "a2a", "all_gather"] = "p2p"
    """How CP ranks exchange keys/values (Megatron's ``cp_comm_type``): ``p2p`` ring (overlaps
    with compute), ``a2a`` all-to-all over heads (Ulysses style: attention heads / TP must divide
    by CP), ``all_gather``. Which ones TE supports for THD depends on its version."""
    sequence_parallel: bool = False
    """Shard activations outside attention/MLP across TP ranks (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (GPU only)."""

    @property
    def model_parallel_size(self) -> int:
        """Processes holding one model replica: TP x PP x CP (data parallel = world / this)."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


@dataclass
class DataConfig:
    """Packed datasets written by ``tools/preprocess_data.py`` (one prefix = one file set)."""

    train_prefix: Union[str, List[str]]
    """Output prefix (or list of prefixes, a mixture) of the training data."""
    seq_length: int
    """Tokens per pack; every pack in the data must fit (the meta's seq_length must not exceed it)."""
    train_weights: Optional[List[float]] = None
    """Relative sampling weight of each train prefix; None concatenates them (each sample once per
    epoch). With weights, an epoch holds as many samples as all prefixes together, drawn in these
    proportions (small sets repeated, large sets subsampled, reshuffled every epoch)."""
    valid_prefix: Union[str, List[str], None] = None
    """Prefix (or list of prefixes) of the validation data; None disables validation."""
    seed: int = 1234
    """Seed of the sample order; epoch e is shuffled with (seed, e)."""
    num_workers: int = 0
    """DataLoader worker processes per rank building micro-batches (0 = in the training process)."""


@dataclass
class TrainingConfig:
    """Batch sizes, optimizer, learning-rate schedule, precision, loss and evaluation cadence."""

    global_batch_size: int
    """Packs per optimizer step over all data-parallel ranks (= micro_batch_size x DP x micro-batches)."""
    train_steps: int
    """Optimizer steps to train for (the end of the learning-rate schedule)."""
    micro_batch_size: int = 1
    """Packs per forward/backward on one data-parallel rank."""
    lr: float = 1e-5
    """Peak learning rate (reached after the warmup)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_warmup_steps: int = 0
    """Steps of linear warmup from 0 to lr."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from lr to min_lr over the steps after warmup."""
    lr_decay_steps: Optional[int] = None
    """Steps at which the decay ends; None means train_steps."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay; not applied to biases and norms."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.95
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    bf16: bool = False
    """bf16 parameters and activations with fp32 main params and grads in the optimizer (GPU only)."""
    loss_normalization: LossMode = "token"
    """Weight of each supervised token: ``token`` every token equal; ``turn`` every assistant turn
    equal; ``sequence`` every conversation equal. The loss is sum(w * ce) / sum(w) over the global batch."""
    lm_head: Literal["supervised", "full"] = "supervised"
    """Where logits are computed: ``supervised`` only at positions with a target, chunk by chunk
    with the gradient taken in the same pass (memory O(lm_head_chunk_tokens x vocab), not
    O(sequence x vocab)); ``full`` Megatron's output layer and cross-entropy at every position.
    Same loss and gradients either way."""
    lm_head_chunk_tokens: int = 4096
    """With lm_head=supervised: positions per chunk (its fp32 logits take chunk x vocab/TP x 4 bytes)."""
    fused_kernels: bool = True
    """On GPU: Megatron's fused SwiGLU (bias_activation_fusion), fused RoPE (apply_rope_fusion),
    fused cross-entropy (lm_head=full) and, with the te backend, the weight gradient accumulated
    straight into the fp32 main grad (gradient_accumulation_fusion). No effect on CPU."""
    fp8: Optional[Literal["tensorwise", "delayed", "blockwise", "mxfp8"]] = None
    """FP8 matmuls in the transformer layers (Transformer Engine, te backend, Hopper or newer) with
    this scaling recipe (Megatron's fp8_recipe; format hybrid: e4m3 forward, e5m2 gradients).
    Embedding, LM head and attention stay bf16. None = bf16 only."""
    recompute_granularity: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: ``selective`` recomputes ``recompute_modules``, ``full`` whole layers."""
    recompute_modules: Optional[List[Literal["core_attn", "mlp", "layernorm"]]] = None
    """With selective recompute: the submodules recomputed in backward (Megatron's names). None =
    Megatron's default ``[core_attn]``; ``[mlp]`` keeps only each MLP's input (long packs: the MLP
    activations are ~2/3 of a layer's, its FLOPs a small share of the step at 128K)."""
    recompute_method: Optional[Literal["uniform", "block"]] = None
    """With full recompute: ``uniform`` chunks of recompute_num_layers, ``block`` the first N layers."""
    recompute_num_layers: Optional[int] = None
    """With full recompute: layers per chunk (uniform) or layers recomputed per stage (block)."""
    seed: int = 1234
    """Seed of weight initialisation and dropout."""
    eval_interval_steps: int = 0
    """Compute the validation loss every this many steps (and at the end); 0 disables."""
    eval_steps: Optional[int] = None
    """Global batches of validation data per evaluation; None means the whole validation set."""
    max_skipped_steps: int = 0
    """Steps whose loss or gradient norm is NaN/inf are skipped (no update, logged with their step
    number); more than this many skipped steps in a row stops training with an error."""


@dataclass
class CheckpointConfig:
    """Where checkpoints are written and read (megatron.core.dist_checkpointing directories)."""

    save: Optional[str] = None
    """Directory of checkpoints (SAVE/iter_0000100/, SAVE/latest_checkpointed_iteration.txt)."""
    load: Optional[str] = None
    """Resume from the latest checkpoint in this directory, or from this one ``iter_*`` directory
    (model, optimizer, schedule, data position, RNG), verified first. Where it holds none yet,
    training starts from ``pretrained`` or from scratch; a path that does not exist is an error
    unless it is ``save`` (one command that starts a run and resumes it)."""
    pretrained: Optional[str] = None
    """Checkpoint directory to take the model from: a converted HF model
    (``tools/convert_hf_to_megatron.py`` output), a trainer save dir (its latest iteration) or one
    ``iter_*`` dir. Its config.yaml's ``model:`` section is the model section (a config may then
    omit ``model:``; a model value given explicitly must equal it, except the run choices
    ``attention_backend`` and ``max_position_embeddings``). Its weights are loaded when there is
    nothing to resume from ``load``."""
    save_interval_steps: int = 0
    """Save every this many steps; 0 saves only at the end (and on SIGTERM)."""
    save_on_sigterm: bool = True
    """On SIGTERM (SLURM preemption): finish the current step, save, and exit 0."""
    keep_last: int = 0
    """Keep only this run's N most recent checkpoints in ``save`` (in the order this run saved
    them, resubmissions included); 0 keeps all. Never removes another run's checkpoints."""
    fallback_to_previous: bool = False
    """When the checkpoint to resume from fails verification (a file missing, truncated or with
    other bytes than its manifest records): false refuses to start, naming each bad file; true
    resumes from the newest older checkpoint in ``load`` that verifies (logged as a warning)."""
    overwrite: bool = False
    """Let a run write into a ``save`` directory that holds checkpoints of another run (a run that
    neither is nor was resumed from). Its checkpoints of the same steps are replaced and the pointer
    moves to this run's; the others are kept, never pruned. False: such a directory is an error."""


@dataclass
class LoggingConfig:
    """Console, JSONL and TensorBoard metrics."""

    dir: Optional[str] = None
    """Directory of metrics.jsonl and TensorBoard events; None means checkpoint.save (and no files
    when that is unset too)."""
    log_interval: int = 1
    """Print and record the metrics every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard events (when the tensorboard package is installed)."""
    wandb_project: Optional[str] = None
    """Also log every metrics record to this Weights & Biases project (rank 0; the run is named
    after the metrics directory). Needs ``pip install wandb``; None: no W&B."""


@dataclass
class SFTConfig:
    """The whole run: YAML files with these sections (``--config`` repeated: later files override
    earlier ones key by key), then ``--section.key=value`` overrides, then the model section of
    ``checkpoint.pretrained`` (see there)."""

    model: ModelConfig
    """The decoder architecture (may be omitted when ``checkpoint.pretrained`` holds a config.yaml)."""
    data: DataConfig
    """Training and validation data."""
    training: TrainingConfig
    """Optimization and evaluation."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Model-parallel layout."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint save/load."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics output."""


# --------------------------------------------------------------------------------------------
# Loading: YAML + ``--section.key=value`` overrides -> SFTConfig, strictly, all issues at once.
# --------------------------------------------------------------------------------------------


class ConfigError(SFTError, ValueError):
    """Invalid user configuration; ``issues`` lists every problem found, each with its fix."""

    def __init__(self, issues: List[str]):
        self.issues = list(issues)
        lines = "\n".join(f"  - {issue}" for issue in self.issues)
        super().__init__(f"invalid configuration ({len(self.issues)} issue(s)):\n{lines}")


_INVALID = object()  # a value that failed conversion (already reported)


def load_config(
    paths: Union[str, Sequence[str], None],
    overrides: Sequence[str] = (),
    *,
    world_size: int = 1,
    has_cuda: bool = False,
    has_te: Optional[bool] = None,
) -> "SFTConfig":
    """Compose the run's config and check it for a job of ``world_size`` processes on a machine
    with or without CUDA and Transformer Engine (``has_te`` None: whether it is installed).

    Order, later wins key by key (sections merge, a list or scalar is replaced whole): the YAML
    files ``paths`` in the order given (a base recipe, then files of overrides), then the
    ``--section.key=value`` ``overrides``. Then, when ``checkpoint.pretrained`` holds a config.yaml
    (a converted HF model or a trainer checkpoint), its ``model:`` section fills the model section;
    a model value also given explicitly must equal it (``RUN_CHOICE_MODEL_KEYS`` excepted).
    Raises ConfigError listing every issue at once (unknown keys name their file)."""
    issues: List[str] = []
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    layers = [(path, _read_yaml(path, issues)) for path in paths]
    if issues:  # an unreadable file: what is missing from it would be reported as noise
        raise ConfigError(issues)
    cli: dict = {}
    for dotted, value in parse_overrides(overrides, issues):
        _set_dotted(cli, dotted, value, issues)
    layers.append(("the command line", cli))
    raw: dict = {}
    origin: Dict[str, str] = {}  # dotted key -> the file (or command line) that set it last
    for source, layer in layers:
        layer = _known_keys(SFTConfig, layer, "", source, issues)
        _deep_merge(raw, layer)
        origin.update(dict.fromkeys(_leaf_paths(layer), source))
    if raw.get("model", {}) is None:  # ``model: null`` (e.g. in an overlay) means "no model section"
        del raw["model"]
    model_missing = not _take_pretrained_model(raw, origin, issues) and "model" not in raw
    build_issues: List[str] = []
    cfg = _build(SFTConfig, raw, "", build_issues)
    if model_missing:  # already reported once with its fix, not once per required model key
        build_issues = [i for i in build_issues if not i.startswith("missing required key 'model.")]
    issues.extend(build_issues)
    if not issues:  # cross-field checks need every field well typed
        issues.extend(check_config(cfg, world_size=world_size, has_cuda=has_cuda, has_te=has_te))
    if issues:
        raise ConfigError(issues)
    return cfg


def _read_yaml(path: str, issues: List[str]) -> dict:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        issues.append(f"cannot read config file {path}: {e}")
        return {}
    if not isinstance(raw, dict):
        issues.append(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
        return {}
    return raw


def _known_keys(cls, raw: object, prefix: str, source: str, issues: List[str]) -> object:
    """``raw`` without the keys dataclass ``cls`` lacks (at any depth), each reported as coming
    from ``source`` (a file path or the command line). Values are left for ``_build`` to check."""
    if not isinstance(raw, dict):
        return raw
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in raw.items():
        if key not in hints:
            issues.append(f"{source}: {_unknown_key(prefix, key, list(hints))}")
            continue
        section = next((t for t in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(t)), None)
        out[key] = _known_keys(section, value, f"{prefix}{key}.", source, issues) if section else value
    return out


def _unknown_key(prefix: str, key: object, known: List[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(known)}"
    return f"unknown key '{prefix}{key}'{hint}"


def _deep_merge(base: dict, layer: dict) -> None:
    """Merge ``layer`` into ``base`` in place: mappings key by key, anything else replaced whole."""
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _leaf_paths(raw: dict, prefix: str = ""):
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            yield from _leaf_paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


# --------------------------------------------------------------------------------------------
# The model section of checkpoint.pretrained (a converted HF model or a trainer checkpoint).
# --------------------------------------------------------------------------------------------

RUN_CHOICE_MODEL_KEYS = ("attention_backend", "max_position_embeddings")
"""Model keys that no weight depends on: a config may set them differently from the checkpoint's."""


def pretrained_config_file(directory: str) -> Optional[str]:
    """The config.yaml describing checkpoint ``directory``, or None: a converted dir and an
    ``iter_*`` dir hold one; a trainer save dir holds one in its latest iteration (the layout of
    ``megatron_sft.training.checkpoint``, read here without importing Megatron)."""
    pointer = os.path.join(directory, "latest_checkpointed_iteration.txt")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            text = f.read().strip()
        if text.isdigit():  # a bad pointer is the trainer's error to report, with its fix
            directory = os.path.join(directory, f"iter_{int(text):07d}")
    path = os.path.join(directory, "config.yaml")
    return path if os.path.isfile(path) else None


def _take_pretrained_model(raw: dict, origin: Dict[str, str], issues: List[str]) -> bool:
    """Fill ``raw["model"]`` from ``checkpoint.pretrained``'s config.yaml, reporting every
    explicit model value that differs from it. True when the model section came from there."""
    checkpoint = raw.get("checkpoint")
    pretrained = checkpoint.get("pretrained") if isinstance(checkpoint, dict) else None
    explicit = raw.get("model", {})
    if not pretrained and "model" not in raw:
        issues.append("no model section: give model: in a --config file, or --checkpoint.pretrained=DIR of a "
                      "converted model (tools/convert_hf_to_megatron.py writes DIR/config.yaml)")
    if not isinstance(pretrained, str) or not pretrained or not isinstance(explicit, dict):
        return False  # nothing to take (a wrong type is reported by _build)
    path = pretrained_config_file(pretrained)
    if path is None:
        required = {f.name for f in dataclasses.fields(ModelConfig) if f.default is dataclasses.MISSING}
        if not required <= set(explicit):
            why = "does not exist" if not os.path.isdir(pretrained) else "holds no config.yaml"
            issues.append(f"checkpoint.pretrained={pretrained} {why}, so it cannot give the model section: point it "
                          "at a tools/convert_hf_to_megatron.py output (or a trainer checkpoint), or give model:")
        return False
    read_issues: List[str] = []
    section = _read_yaml(path, read_issues).get("model")
    if read_issues or not isinstance(section, dict):
        issues.extend(read_issues or [f"{path} (checkpoint.pretrained) has no model: section: re-convert the "
                                      "model, or give model:"])
        return False
    section = _known_keys(ModelConfig, section, "model.", path, issues)
    merged = copy.deepcopy(section)
    _deep_merge(merged, explicit)
    issues.extend(_model_conflicts(section, merged, explicit, origin, path))
    raw["model"] = merged
    return True


def _model_conflicts(section: dict, merged: dict, explicit: dict, origin: Dict[str, str], path: str) -> List[str]:
    """Each model key given explicitly whose (typed) value differs from the checkpoint's."""
    hints = typing.get_type_hints(ModelConfig)
    conflicts = []
    for key in section:
        if key in RUN_CHOICE_MODEL_KEYS or key not in explicit:
            continue
        scratch: List[str] = []  # a value of the wrong type is reported once, by _build
        theirs = _convert(hints[key], section[key], f"model.{key}", scratch)
        ours = _convert(hints[key], merged[key], f"model.{key}", scratch)
        if scratch or theirs == ours:
            continue
        dotted = f"model.{key}"
        where = origin.get(dotted) or next((s for k, s in origin.items() if k.startswith(dotted + ".")), "config")
        conflicts.append(
            f"{dotted}={_plain(ours)!r} ({where}) conflicts with {_plain(theirs)!r} in {path}, the model of "
            f"checkpoint.pretrained: remove {dotted} from {where} (the model section comes from the checkpoint), "
            "or point checkpoint.pretrained at the model you mean")
    return conflicts


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def parse_overrides(args: Sequence[str], issues: List[str]) -> List[Tuple[str, object]]:
    """``["--training.lr=3e-4", "--data.seed", "7"]`` -> ``[("training.lr", 3e-4), ("data.seed", 7)]``.
    Values are parsed as YAML scalars/lists (``true``, ``[a, b]``, ``null``)."""
    out: List[Tuple[str, object]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            issues.append(f"override {arg!r}: expected --section.key=value (e.g. --training.lr=1e-4)")
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            if i >= len(args):
                issues.append(f"override --{key}: missing value (use --{key}=VALUE)")
                continue
            text = args[i]
            i += 1
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        out.append((key, value))
    return out


def _set_dotted(raw: dict, dotted: str, value: object, issues: List[str]) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            issues.append(f"override --{dotted}: '{part}' is not a section")
            return
        node = child
    node[parts[-1]] = value


def _build(cls, raw: object, prefix: str, issues: List[str]):
    """Build dataclass ``cls`` from a mapping, reporting unknown/missing keys and bad types."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        issues.append(f"{where}: expected a mapping of {cls.__name__} fields, got {raw!r}")
        raw = {}
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:  # load_config drops these first, naming their file
            issues.append(_unknown_key(prefix, key, list(known)))
    kwargs = {}
    for name, f in known.items():
        dotted = f"{prefix}{name}"
        if name in raw:
            value = _convert(hints[name], raw[name], dotted, issues)
            kwargs[name] = None if value is _INVALID else value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, dotted + ".", issues)
            else:
                doc = field_docs(cls).get(name, "")
                issues.append(f"missing required key '{dotted}' ({doc.splitlines()[0] if doc else name})")
                kwargs[name] = None
    return cls(**kwargs)


def _convert(tp, value, dotted: str, issues: List[str]):
    """Convert one YAML value to type ``tp``; report and return _INVALID when it does not fit."""
    result = _try_convert(tp, value, dotted, issues)
    if result is _INVALID:
        issues.append(f"'{dotted}' = {value!r}: expected {_type_name(tp)}")
    return result


def _try_convert(tp, value, dotted: str, issues: List[str]):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None:
            return None if type(None) in args else _INVALID
        for arg in args:
            if arg is type(None):
                continue
            sub_issues: List[str] = []
            result = _try_convert(arg, value, dotted, sub_issues)
            if result is not _INVALID:
                issues.extend(sub_issues)
                return result
        return _INVALID
    if origin is Literal:
        return value if value in args else _INVALID
    if origin in (list, List):
        if not isinstance(value, list):
            return _INVALID
        items = [_try_convert(args[0], v, f"{dotted}[{i}]", issues) for i, v in enumerate(value)]
        return _INVALID if any(v is _INVALID for v in items) else items
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, dotted + ".", issues) if isinstance(value, dict) else _INVALID
    if tp is bool:
        return value if isinstance(value, bool) else _INVALID
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if tp is float:
        return _to_float(value)
    if tp is str:
        return value if isinstance(value, str) else _INVALID
    raise TypeError(f"unsupported config field type {tp} at {dotted}")  # a bug in this module


def _to_float(value):
    # PyYAML reads "1e-5" (no dot) as a string: accept any string float() accepts.
    if isinstance(value, bool):
        return _INVALID
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return _INVALID
    return _INVALID


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, List):
        return f"a list of {_type_name(args[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def field_docs(cls) -> Dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (parsed from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def config_help(cls=None, prefix: str = "") -> str:
    """``--help`` text: every ``--section.key`` with its type, default and docstring."""
    cls = cls or SFTConfig
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n[{prefix}{f.name}] {inspect.cleandoc(tp.__doc__ or '')}")
            lines.append(config_help(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f"default {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = "default {}"
        else:
            default = "required"
        lines.append(f"  --{prefix}{f.name} ({_type_name(tp)}; {default})")
        lines.extend("      " + line for line in docs.get(f.name, "").splitlines())
    return "\n".join(lines)


def config_to_dict(cfg) -> dict:
    """The resolved config as plain YAML-able data (what is printed and saved as config.yaml)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def as_list(prefix: Union[str, List[str], None]) -> List[str]:
    """A data prefix field as a list (``None`` -> ``[]``)."""
    if prefix is None:
        return []
    return [prefix] if isinstance(prefix, str) else list(prefix)


# --------------------------------------------------------------------------------------------
# Cross-field checks: every bad combination, each with key, value and the fix.
# --------------------------------------------------------------------------------------------


def check_config(cfg: "SFTConfig", *, world_size: int, has_cuda: bool, has_te: Optional[bool] = None) -> List[str]:
    """Every inconsistency of a well-typed config for a job of ``world_size`` processes."""
    issues: List[str] = []
    has_te = has_cuda and te_installed() if has_te is None else has_te
    for check in (_check_positive, _check_model_parallel, _check_batch, _check_devices,
                  _check_schedule, _check_data, _check_outputs):
        if check is _check_devices:
            check(cfg, has_cuda, has_te, issues)
        else:
            check(cfg, world_size, has_cuda, issues)
    return issues


ATTENTION_BACKENDS = ("auto", "te", "torch")


def te_installed() -> bool:
    """Transformer Engine is installed (cheap: no import; ``model.spec`` also checks it imports)."""
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def resolve_attention_backend(name: str, *, has_cuda: bool, has_te: bool) -> str:
    """The core attention a run uses: ``auto`` is ``te`` with CUDA and Transformer Engine, else
    ``torch``. The one rule: the config checks and the model spec (``model.spec``) ask it.
    Raises ValueError with the fix for an unknown name or ``te`` where it cannot run."""
    if name not in ATTENTION_BACKENDS:
        raise InputError(f"model.attention_backend={name!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    available = has_cuda and has_te
    if name == "te" and not available:
        missing = "no GPU here" if not has_cuda else "transformer_engine does not import"
        raise InputError(f"model.attention_backend='te' needs a GPU and Transformer Engine ({missing}): install "
                         "the te extra on a GPU machine or use --model.attention_backend=torch")
    return "te" if name != "torch" and available else "torch"


def _check_positive(cfg, world_size, has_cuda, issues):
    t, p, m = cfg.training, cfg.parallel, cfg.model
    for key, value in [
        ("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads), ("model.vocab_size", m.vocab_size),
        ("data.seq_length", cfg.data.seq_length), ("training.micro_batch_size", t.micro_batch_size),
        ("training.global_batch_size", t.global_batch_size), ("training.train_steps", t.train_steps),
        ("parallel.tensor_model_parallel_size", p.tensor_model_parallel_size),
        ("parallel.pipeline_model_parallel_size", p.pipeline_model_parallel_size),
        ("parallel.context_parallel_size", p.context_parallel_size),
        ("logging.log_interval", cfg.logging.log_interval),
    ]:
        if value < 1:
            issues.append(f"{key}={value}: must be >= 1")
    for key, value in [("training.lr", t.lr), ("training.min_lr", t.min_lr),
                       ("training.weight_decay", t.weight_decay), ("training.clip_grad", t.clip_grad),
                       ("training.lr_warmup_steps", t.lr_warmup_steps),
                       ("training.eval_interval_steps", t.eval_interval_steps),
                       ("training.max_skipped_steps", t.max_skipped_steps),
                       ("checkpoint.save_interval_steps", cfg.checkpoint.save_interval_steps),
                       ("checkpoint.keep_last", cfg.checkpoint.keep_last),
                       ("data.num_workers", cfg.data.num_workers)]:
        if value < 0:
            issues.append(f"{key}={value}: must be >= 0")


def model_split_problems(m: ModelConfig, tp: int, pp: int, vp: Optional[int] = None, *,
                         qualified: bool = True) -> List[str]:
    """Why ``m`` cannot be split over ``tp`` tensor ranks and ``pp`` pipeline stages (x ``vp``
    virtual chunks). The one home of these rules: the trainer config and the converters ask it.
    ``qualified``: name fields by their config path (``model.``/``parallel.``) or bare (CLI options)."""
    model = (lambda name: f"model.{name}") if qualified else (lambda name: name)
    par = (lambda name: f"parallel.{name}") if qualified else (lambda name: name)
    problems = []
    if tp >= 1:
        for name, value, what in (("num_attention_heads", m.num_attention_heads, "it"),
                                  ("num_query_groups", m.query_groups, "the number of key/value heads"),
                                  ("vocab_size", m.vocab_size, "the embedding rows")):
            if value % tp:
                problems.append(f"{model(name)}={value} is not divisible by {par('tensor_model_parallel_size')}"
                                f"={tp}: choose a TP size that divides {what}")
    if m.query_groups >= 1 and m.num_attention_heads % m.query_groups:
        problems.append(f"{model('num_attention_heads')}={m.num_attention_heads} is not a multiple of "
                        f"{model('num_query_groups')}={m.query_groups}: fix the model's GQA groups")
    stages = pp * (vp or 1)
    if stages >= 1 and m.num_layers % stages:
        problems.append(f"{model('num_layers')}={m.num_layers} is not divisible by pipeline stages x virtual "
                        f"chunks = {pp} x {vp or 1} ({par('pipeline_model_parallel_size')}={pp}): pick PP/VP "
                        "whose product divides num_layers")
    return problems


def world_size_problem(p: ParallelConfig, world_size: int) -> Optional[str]:
    """Why ``world_size`` processes cannot hold the layout ``p`` (data parallel = world / TP*PP*CP)."""
    if p.model_parallel_size >= 1 and world_size % p.model_parallel_size:
        return (f"world size {world_size} is not divisible by TP x PP x CP = {p.tensor_model_parallel_size} x "
                f"{p.pipeline_model_parallel_size} x {p.context_parallel_size}: launch a multiple of "
                f"{p.model_parallel_size} processes or change the parallel section")
    return None


def _check_model_parallel(cfg, world_size, has_cuda, issues):
    m, p = cfg.model, cfg.parallel
    tp, pp, vp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    issues.extend(model_split_problems(m, tp, pp, vp))
    if vp is not None and pp < 2:
        issues.append(f"parallel.virtual_pipeline_model_parallel_size={vp} needs "
                      f"parallel.pipeline_model_parallel_size >= 2 (is {pp}): unset it or raise PP")
    if p.context_parallel_size > 1 and p.context_parallel_comm_type == "a2a" and \
            tp >= 1 and (m.num_attention_heads // tp) % p.context_parallel_size:
        issues.append(f"parallel.context_parallel_comm_type='a2a' splits the {m.num_attention_heads // tp} attention "
                      f"heads per TP rank over context_parallel_size={p.context_parallel_size} ranks, which does "
                      "not divide them: use p2p or a CP size that divides the heads per TP rank")
    if p.sequence_parallel and tp < 2:
        issues.append("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size >= 2: "
                      "set --parallel.sequence_parallel=false or raise TP")
    problem = world_size_problem(p, world_size)
    if problem:
        issues.append(problem)


def _check_batch(cfg, world_size, has_cuda, issues):
    t, p = cfg.training, cfg.parallel
    model_parallel = p.model_parallel_size
    if model_parallel >= 1 and world_size % model_parallel == 0 and t.micro_batch_size >= 1:
        dp = world_size // model_parallel
        if t.global_batch_size % (t.micro_batch_size * dp):
            issues.append(f"training.global_batch_size={t.global_batch_size} is not divisible by "
                          f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}: set it to a "
                          f"multiple of {t.micro_batch_size * dp}")
        elif (p.virtual_pipeline_model_parallel_size or 1) > 1 and \
                (t.global_batch_size // (t.micro_batch_size * dp)) % p.pipeline_model_parallel_size:
            per_rank = t.global_batch_size // (t.micro_batch_size * dp)
            issues.append(f"training.global_batch_size={t.global_batch_size} gives {per_rank} micro-batches per "
                          f"data-parallel rank; interleaved pipelines run them in groups of pipeline_model_"
                          f"parallel_size={p.pipeline_model_parallel_size}: set global_batch_size to a multiple "
                          f"of {t.micro_batch_size * dp * p.pipeline_model_parallel_size}")
    cp = p.context_parallel_size
    if cp > 1 and cfg.data.seq_length % (2 * cp):
        issues.append(f"data.seq_length={cfg.data.seq_length} is not divisible by 2 x context_parallel_size"
                      f" = {2 * cp}: use a multiple of {2 * cp}")
    if cfg.data.seq_length > cfg.model.max_position_embeddings:
        issues.append(f"data.seq_length={cfg.data.seq_length} exceeds model.max_position_embeddings="
                      f"{cfg.model.max_position_embeddings}: raise max_position_embeddings or shorten packs")


def _check_devices(cfg, has_cuda, has_te, issues):
    p, t, backend = cfg.parallel, cfg.training, cfg.model.attention_backend
    try:
        resolved = resolve_attention_backend(backend, has_cuda=has_cuda, has_te=has_te)
    except ValueError as err:
        issues.append(str(err))
        resolved = None
    if p.context_parallel_size > 1 and resolved == "torch":
        issues.append(f"parallel.context_parallel_size={p.context_parallel_size} needs the te attention "
                      f"backend (model.attention_backend={backend!r}"
                      f"{', no GPU here' if not has_cuda else '' if has_te else ', no Transformer Engine here'}): "
                      "set --model.attention_backend=te on GPUs with Transformer Engine "
                      "or --parallel.context_parallel_size=1")
    if not has_cuda:
        cpu_only = [("parallel.use_distributed_optimizer", p.use_distributed_optimizer, "false"),
                    ("training.bf16", t.bf16, "false")]
        for key, value, fix in cpu_only:
            if value:
                issues.append(f"{key}={str(value).lower()} is not supported on CPU: set --{key}={fix}")
    if t.fp8 is not None:
        if resolved != "te" or not t.bf16:
            issues.append(f"training.fp8={t.fp8!r} needs a GPU, the te attention backend and training.bf16=true "
                          f"(here: {'GPU' if has_cuda else 'no GPU'}, attention_backend={backend!r}, bf16={t.bf16}): "
                          "unset training.fp8 or train on a Hopper-class GPU with --training.bf16=true")
    if t.lm_head_chunk_tokens < 1:
        issues.append(f"training.lm_head_chunk_tokens={t.lm_head_chunk_tokens}: must be >= 1")
    if t.recompute_granularity == "full" and (t.recompute_method is None or t.recompute_num_layers is None):
        issues.append("training.recompute_granularity='full' needs training.recompute_method (uniform|block) "
                      "and training.recompute_num_layers: set both (e.g. uniform and 1)")
    if t.recompute_modules is not None and t.recompute_granularity != "selective":
        issues.append(f"training.recompute_modules only applies to selective recompute "
                      f"(recompute_granularity={t.recompute_granularity!r}): unset it or set selective")
    if t.recompute_granularity != "full" and (t.recompute_method or t.recompute_num_layers):
        issues.append(f"training.recompute_method/recompute_num_layers only apply to full recompute "
                      f"(recompute_granularity={t.recompute_granularity!r}): unset them")


def _check_schedule(cfg, world_size, has_cuda, issues):
    t = cfg.training
    decay_steps = t.lr_decay_steps if t.lr_decay_steps is not None else t.train_steps
    if t.min_lr > t.lr:
        issues.append(f"training.min_lr={t.min_lr} exceeds training.lr={t.lr}: set min_lr <= lr")
    if t.lr_warmup_steps > decay_steps and t.lr_decay_style != "constant":
        issues.append(f"training.lr_warmup_steps={t.lr_warmup_steps} must be <= the decay steps "
                      f"({decay_steps}): shorten the warmup or raise training.lr_decay_steps")
    if not 0.0 <= t.adam_beta1 < 1.0 or not 0.0 <= t.adam_beta2 < 1.0:
        issues.append(f"training.adam_beta1/adam_beta2=({t.adam_beta1}, {t.adam_beta2}): each must be in [0, 1)")
    if t.eval_steps is not None and t.eval_steps < 1:
        issues.append(f"training.eval_steps={t.eval_steps}: must be >= 1 or null (whole validation set)")


def _check_data(cfg, world_size, has_cuda, issues):
    d, t = cfg.data, cfg.training
    train = as_list(d.train_prefix)
    if not train:
        issues.append("data.train_prefix is empty: give at least one dataset prefix")
    if d.train_weights is not None:
        if len(d.train_weights) != len(train):
            issues.append(f"data.train_weights has {len(d.train_weights)} entries for {len(train)} "
                          "train prefixes: give one weight per prefix")
        if any(w < 0 for w in d.train_weights) or sum(d.train_weights) <= 0:
            issues.append(f"data.train_weights={d.train_weights}: weights must be >= 0 with a positive sum")
    if t.eval_interval_steps > 0 and not as_list(d.valid_prefix):
        issues.append(f"training.eval_interval_steps={t.eval_interval_steps} needs data.valid_prefix: "
                      "set it or --training.eval_interval_steps=0")


def _check_outputs(cfg, world_size, has_cuda, issues):
    c = cfg.checkpoint
    if c.save_interval_steps > 0 and not c.save:
        issues.append(f"checkpoint.save_interval_steps={c.save_interval_steps} needs checkpoint.save: "
                      "set --checkpoint.save=DIR")


def ineffective_settings(cfg: "SFTConfig") -> List[str]:
    """Settings that are valid but do nothing in this config (warned once at start-up)."""
    t, c, lg = cfg.training, cfg.checkpoint, cfg.logging
    notes = []
    if t.eval_steps is not None and t.eval_interval_steps == 0:
        notes.append("training.eval_steps has no effect with training.eval_interval_steps=0 (except --eval-only)")
    if c.keep_last and not c.save:
        notes.append("checkpoint.keep_last has no effect without checkpoint.save")
    if lg.dir is None and c.save is None:
        notes.append("no logging.dir and no checkpoint.save: metrics go to the console only")
    if t.lr_decay_style == "constant" and (t.min_lr or t.lr_decay_steps is not None):
        notes.append("training.min_lr/lr_decay_steps have no effect with lr_decay_style=constant")
    if t.lm_head == "full" and t.lm_head_chunk_tokens != TrainingConfig.lm_head_chunk_tokens:
        notes.append("training.lm_head_chunk_tokens has no effect with training.lm_head=full")
    if cfg.data.train_weights is not None and len(as_list(cfg.data.train_prefix)) == 1:
        notes.append("data.train_weights has no effect with a single train prefix")
    return notes
