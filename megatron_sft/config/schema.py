"""The typed configuration tree: one dataclass per section, a docstring under every field (it
doubles as ``--help``), derived values as properties. Loading is ``config.loader``; cross-field
rules are ``config.checks``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union

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
    fused cross-entropy (lm_head=full; with lm_head=supervised its chunk arithmetic compiled by
    torch.compile) and, with the te backend, the weight gradient accumulated straight into the fp32
    main grad (gradient_accumulation_fusion). No effect on CPU."""
    activation_kernel: Literal["auto", "megatron", "te"] = "auto"
    """With fused_kernels on GPU: the SwiGLU kernel. ``megatron`` Megatron's fused function
    (bias_activation_fusion); ``te`` Transformer Engine's ``ops.SwiGLU`` (use_te_activation_func,
    te backend only); ``auto`` Megatron's. Same values either way."""
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
    """With full recompute: layers per chunk (uniform) or layers recomputed per stage (block).
    With selective recompute: only the first N layers of each stage (each model chunk under
    interleaving) recompute ``recompute_modules``; the others keep their activations (long packs:
    spend the memory left over on less recompute). None = every layer."""
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

def as_list(prefix: Union[str, List[str], None]) -> List[str]:
    """A data prefix field as a list (``None`` -> ``[]``)."""
    if prefix is None:
        return []
    return [prefix] if isinstance(prefix, str) else list(prefix)
