"""Model construction: our config -> Megatron's TransformerConfig -> GPTModel chunks.

``build_gpt_model`` is the only function that constructs a model (a later move to Megatron's
``HybridModel`` touches this file only). Checkpoint keys are canonical (Transformer Engine names)
whatever the backend: ``canonical_sharded_state_dict``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

import megatron_sft.mcore  # noqa: F401
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_sft.config import ModelConfig, ParallelConfig
from megatron_sft.errors import InputError
from megatron_sft.model.spec import get_block_spec

LOCAL_TO_CANONICAL = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}
"""Local-spec (``torch`` backend) key fragments -> canonical (TE) ones. TE fuses the pre-attention
and pre-MLP norms into ``linear_qkv`` / ``linear_fc1``; the tensors are identical."""


def transformer_config_from(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    recompute_granularity: Optional[str] = None,
    recompute_method: Optional[str] = None,
    recompute_num_layers: Optional[int] = None,
    use_cpu_initialization: Optional[bool] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for a Llama-style decoder (RMSNorm, SwiGLU, no biases but
    optional QKV bias, RoPE set on GPTModel) with per-token loss (``calculate_per_token_loss``:
    the loss function returns (weighted sum, weight) and Megatron divides by the global weight).

    ``bf16``: bf16 compute (``params_dtype`` is then usually torch.bfloat16, with Megatron's fp32
    main params in the optimizer). ``recompute_*``: Megatron's activation recompute settings
    (``granularity`` ``full``|``selective``; ``method`` ``uniform``|``block``).
    ``use_cpu_initialization``: initialise full weights on CPU and split them (random init then
    independent of TP); None = only when CUDA is absent. ``overrides``: further TransformerConfig
    fields (e.g. GPU fusions ``bias_activation_fusion``, ``apply_rope_fusion``). Dropout is 0.
    Interleaved pipelines (virtual size > 1) need fixed-length micro-batches (``pad_to_length``)."""
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    interleaved = (parallel_cfg.virtual_pipeline_model_parallel_size or 1) > 1
    fields = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.query_groups,
        kv_channels=model_cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model_cfg.add_qkv_bias,
        qk_layernorm=model_cfg.qk_layernorm,
        init_method_std=model_cfg.init_method_std,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel_cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel_cfg.context_parallel_size,
        cp_comm_type=parallel_cfg.context_parallel_comm_type if parallel_cfg.context_parallel_size > 1 else None,
        sequence_parallel=parallel_cfg.sequence_parallel,
        calculate_per_token_loss=True,
        # Packed micro-batches differ in length: pipeline stages exchange shapes first (Megatron
        # validates this against the MoE dispatcher even for dense models, hence alltoall).
        # Interleaved 1F1B: fixed lengths (``build_micro_batch(pad_to_length=...)``) and unbatched
        # p2p, Megatron-LM's default there. With PP=2 a stage's previous and next peer are the
        # same rank and batched p2p ops carry no tags, so activations and gradients sent in one
        # batch can land in each other's buffers (seen on gloo: wrong loss, no error).
        variable_seq_lengths=not interleaved,
        batch_p2p_comm=not interleaved,
        moe_token_dispatcher_type="alltoall",
        use_cpu_initialization=use_cpu_initialization,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
    )
    fields.update(overrides or {})
    return TransformerConfig(**fields)


def _apply_rope_scaling(model: GPTModel, model_cfg: ModelConfig, config: TransformerConfig) -> None:
    """Llama-3 RoPE scaling with all four HF parameters (GPTModel takes only the factor and
    hard-codes low 1, high 4, original 8192)."""
    scaling = model_cfg.rope_scaling
    rope = getattr(model, "rotary_pos_emb", None)
    if scaling is None or rope is None:
        return
    dim = config.kv_channels
    base = 1.0 / (
        model_cfg.rotary_base
        ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim)
    )
    rope.inv_freq = rope._apply_scaling(
        base,
        factor=scaling.factor,
        low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings,
    )


def build_gpt_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    *,
    backend: str,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    transformer_config: Optional[TransformerConfig] = None,
    init_seed: Optional[int] = None,
) -> GPTModel:
    """The one function constructing a model: this rank's GPTModel (chunk ``vp_stage``).

    ``backend``: resolved ``te`` | ``torch`` (``spec.resolve_attention_backend``).
    ``transformer_config``: defaults to ``transformer_config_from(model_cfg, parallel_cfg)``.
    ``init_seed``: seed every transformer layer's CPU-generator draws by its global layer number
    (``seed_layers_by_number``); with CPU initialisation the random weights are then the same in
    every parallel layout. None: Megatron's build order decides (differs by PP).
    Parameters are on the current CUDA device (CPU without CUDA)."""
    if model_cfg.rope_scaling is not None and model_cfg.rope_scaling.rope_type != "llama3":
        raise InputError(
            f"model.rope_scaling.rope_type {model_cfg.rope_scaling.rope_type!r} is not supported; "
            "only llama3 is"
        )
    config = transformer_config or transformer_config_from(model_cfg, parallel_cfg)
    with _output_layer_without_apex(config) as patched:
        model = _gpt_model(model_cfg, config, backend, pre_process, post_process, vp_stage, init_seed)
    if patched and getattr(model, "output_layer", None) is not None:
        model.output_layer.gradient_accumulation_fusion = False
    _apply_rope_scaling(model, model_cfg, config)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


@contextlib.contextmanager
def _output_layer_without_apex(config: TransformerConfig):
    """With ``gradient_accumulation_fusion`` (TE layers accumulate weight gradients straight into
    the fp32 main grad), Megatron's output layer refuses to be built unless Apex's
    ``fused_weight_gradient_mlp_cuda`` is installed, although only the output layer would use it.
    Build it anyway (yields True then) and the caller turns the fusion off for the output layer
    alone: the transformer layers keep TE's fused path; the output layer takes plain autograd."""
    from megatron.core.tensor_parallel import layers

    if not config.gradient_accumulation_fusion or layers._grad_accum_fusion_available:
        yield False
        return
    layers._grad_accum_fusion_available = True
    try:
        yield True
    finally:
        layers._grad_accum_fusion_available = False


def layer_init_seed(seed: int, global_layer_number: int) -> int:
    """Seed of the CPU generator while transformer layer ``global_layer_number`` (1-based, over
    the whole model) is built: a function of the run's seed and the layer only."""
    return (seed * 1_000_003 + global_layer_number) % (2 ** 63)


def _seeded_layer_class(layer_class: type, seed: int) -> type:
    """``layer_class`` that seeds the CPU generator with ``layer_init_seed(seed, its global layer
    number)`` before building its weights.

    Why: with CPU initialisation (``use_cpu_initialization``, the default without CUDA) Megatron
    draws every full weight from one CPU generator in build order, so under PP=2 the second stage
    drew layer 3's weights from where one process drew layer 1's. Seeding per layer makes the
    initial weights independent of TP/PP/VP/DP; the embedding is built before any layer (first
    stage) and the output layer right after the last layer (last stage), so both follow too."""

    class SeededLayer(layer_class):
        def __init__(self, config, submodules, layer_number: int = 1, *args, **kwargs):
            pg_collection, vp_stage = kwargs.get("pg_collection"), kwargs.get("vp_stage")
            pp_rank = pg_collection.pp.rank() if pg_collection is not None else None
            offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
            torch.manual_seed(layer_init_seed(seed, layer_number + offset))
            super().__init__(config, submodules, layer_number, *args, **kwargs)

    SeededLayer.__name__ = SeededLayer.__qualname__ = layer_class.__name__
    return SeededLayer


def seed_layers_by_number(block_spec, seed: int):
    """``block_spec`` (a layer ModuleSpec or a TransformerBlockSubmodules) with every layer built
    by ``_seeded_layer_class``; the spec objects passed in are not modified."""
    def seeded(spec):
        return dataclasses.replace(spec, module=_seeded_layer_class(spec.module, seed))

    if isinstance(block_spec, ModuleSpec):
        return seeded(block_spec)
    return dataclasses.replace(block_spec, layer_specs=[seeded(spec) for spec in block_spec.layer_specs])


def _gpt_model(model_cfg, config, backend, pre_process, post_process, vp_stage, init_seed=None) -> GPTModel:
    block_spec = get_block_spec(model_cfg, backend, config, vp_stage=vp_stage)
    if init_seed is not None:
        block_spec = seed_layers_by_number(block_spec, init_seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not model_cfg.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=model_cfg.rotary_base,
        rope_scaling=model_cfg.rope_scaling is not None,
        rope_scaling_factor=model_cfg.rope_scaling.factor if model_cfg.rope_scaling else 8.0,
        vp_stage=vp_stage,
    )
    return model


def limit_selective_recompute(model: GPTModel, num_layers: int) -> None:
    """Selective recompute in the first ``num_layers`` layers of ``model`` (one chunk) only: the
    others keep every activation. Megatron sets its per-layer recompute switches from the config
    when it builds a layer and reads them in forward; this turns them off past the first
    ``num_layers`` (Megatron's own ``recompute_num_layers`` applies to full recompute only)."""
    for layer in list(model.decoder.layers)[num_layers:]:
        layer.recompute_input_layernorm = False
        layer.recompute_pre_mlp_layernorm = False
        layer.recompute_mlp = False
        layer.self_attention.checkpoint_core_attention = False


def build_model_chunks(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    *,
    backend: str,
    transformer_config: Optional[TransformerConfig] = None,
    init_seed: Optional[int] = None,
) -> list[GPTModel]:
    """This rank's model chunks, in order: one per virtual pipeline stage (a single chunk without
    interleaving). Needs ``runtime.setup_model_parallel`` first. ``init_seed``: see
    ``build_gpt_model``."""
    config = transformer_config or transformer_config_from(model_cfg, parallel_cfg)
    vp_size = parallel_cfg.virtual_pipeline_model_parallel_size
    if vp_size is None or vp_size <= 1:
        stages = [None]
    else:
        stages = list(range(vp_size))
    chunks = []
    for vp_stage in stages:
        chunks.append(
            build_gpt_model(
                model_cfg,
                parallel_cfg,
                backend=backend,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
                transformer_config=config,
                init_seed=init_seed,
            )
        )
    return chunks


def canonical_key(name: str) -> str:
    """Canonical (TE) name of a local-spec parameter/state-dict key; other keys unchanged.
    ``decoder.layers.0.input_layernorm.weight`` -> ``decoder.layers.0.self_attention.linear_qkv.layer_norm_weight``."""
    for local, canonical in LOCAL_TO_CANONICAL.items():
        if f".{local}" in name:
            return name.replace(f".{local}", f".{canonical}")
    return name


def canonical_sharded_state_dict(chunk: GPTModel, prefix: str = "", **kwargs) -> dict:
    """``chunk.sharded_state_dict`` with canonical keys, loadable by either backend.

    The local spec already renames its norm keys to TE names (Megatron's
    ``sharded_state_dict_keys_map``); this asserts that and drops TE's ``_extra_state`` entries
    (FP8 metadata, empty without FP8), which the local spec has no counterpart for."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    # One entry per global layer number (``decoder.layers.7.…``), not Megatron's default of one
    # tensor per parameter stacked over this stage's layers: the converter writes this layout, and
    # per-layer keys reshard across any PP/VP split.
    kwargs.setdefault("metadata", {"non_homogeneous_layers": True})
    state = chunk.sharded_state_dict(prefix=prefix, **kwargs)
    out = {}
    for name, value in state.items():
        if name.endswith("_extra_state"):
            continue
        key = getattr(value, "key", name) if isinstance(value, ShardedBase) else name
        assert canonical_key(key) == key, f"non-canonical checkpoint key {key}"
        out[name] = value
    return out

