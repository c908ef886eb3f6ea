"""Model side of the trainer: layer spec, attention backends, model construction, CPU runtime.

Interface for the training code (signatures kept stable; import the submodules directly, this
package imports nothing so that ``import megatron_sft.model`` stays cheap)::

    # megatron_sft/model/runtime.py
    initialize_distributed(backend: str | None = None, timeout_minutes: int = 30) -> None
        # torchrun/SLURM env:// process group; nccl with CUDA, gloo without; world of 1 if no env.
    setup_model_parallel(parallel_cfg: ParallelConfig, *, seed: int = 1234) -> None
        # initialize_model_parallel(TP, PP, VPP, CP) + apply_cpu_patches() (CPU only) + seeds.
        # ValueError if world size % (TP*PP*CP) != 0.
    apply_cpu_patches() -> None       # idempotent, process-global, no-op with CUDA
    teardown_model_parallel() -> None

    # megatron_sft/model/spec.py
    resolve_attention_backend(name: str) -> "te" | "torch"   # auto: te iff TE imports and CUDA
    get_layer_spec(model_cfg: ModelConfig, backend: str) -> ModuleSpec

    # megatron_sft/model/build.py
    transformer_config_from(model_cfg, parallel_cfg, *, params_dtype=torch.float32, bf16=False,
                            recompute_granularity=None, recompute_method=None,
                            recompute_num_layers=None, use_cpu_initialization=None,
                            overrides: Mapping | None = None) -> TransformerConfig
        # calculate_per_token_loss=True, dropout 0, variable_seq_lengths=True except with
        # interleaving (virtual pipeline > 1): then micro-batches must have a fixed length, i.e.
        # build_micro_batch(..., pad_to_length=L) with the same L as the schedule's seq_length.
    build_gpt_model(model_cfg, parallel_cfg, *, backend, pre_process=True, post_process=True,
                    vp_stage=None, transformer_config=None) -> GPTModel
    build_model_chunks(model_cfg, parallel_cfg, *, backend, transformer_config=None)
        -> list[GPTModel]            # one per virtual stage; pre/post_process from parallel_state
    canonical_sharded_state_dict(chunk, prefix="", **kwargs) -> ShardedStateDict
        # checkpoint keys = TE names for both backends; use it for dist_checkpointing save AND load
        # (Megatron-LM style for several chunks: {"model0": ..., "model1": ...}).
    load_canonical_state_dict(chunk, state_dict) -> None
        # load what dist_checkpointing.load(canonical_sharded_state_dict(chunk), path) returned;
        # strict but for TE's _extra_state (absent from torch-backend checkpoints). Do not use
        # chunk.load_state_dict directly: a torch-backend checkpoint fails strict loading into TE.
    canonical_key(name: str) -> str   # local-spec key -> TE key (conversion tools)

    # megatron_sft/model/attention.py
    TorchCoreAttention                # core attention of the torch backend (THD + SBHD, GQA)
    causal_attention_per_segment(q, k, v, cu_seqlens, cu_seqlens_padded=None, scale=None)

    # megatron_sft/data/labels.py
    IGNORE_INDEX = -100; LOSS_MODES = ("token", "turn", "sequence")
    shift_labels(tokens, loss_mask, cu_seqlens) -> np.int64 [T]
    target_mask(loss_mask, cu_seqlens) -> bool [T]
    loss_weights(loss_mask, cu_seqlens, mode) -> np.float32 [T]

    # megatron_sft/data/batches.py
    build_micro_batch(packs, *, seq_length, loss_mode="token", tensor_model_parallel_size=1,
                      sequence_parallel=False, context_parallel_size=1, context_parallel_rank=0,
                      pad_to_length=None) -> MicroBatch
        # pad_to_length: fixed total (multiple of total_multiple), ValueError if packs don't fit.
    MicroBatch: tokens, labels, position_ids, source_index (int64 [1, T]; source -1 at padding),
                loss_weight (float32 [1, T]), packed_seq_params (PackedSeqParams, thd),
                num_real_tokens, num_targets (ints, whole micro-batch); .to(device)
    padding_multiples(context_parallel_size=1, tensor_model_parallel_size=1, sequence_parallel=False)
        -> (conversation_multiple, total_multiple)
    cp_partition_indices(cu_seqlens_padded, total_length, cp_size, cp_rank) -> np.ndarray

Forward call on a micro-batch (all stages; non-first stages get their input from the schedule)::

    output = model(mb.tokens, mb.position_ids, None, labels=mb.labels.clamp(min=0),
                   packed_seq_params=mb.packed_seq_params)   # per-token loss [1, T] on last stage
    loss = (output.float() * mb.loss_weight).sum()
    # loss_func returns (loss, num_tokens, {...}); Megatron divides what it gets in place (clone
    # for logs). num_tokens MUST be an int tensor: the schedules accumulate it into
    # torch.zeros([], dtype=torch.int) and `int += float` raises. Token mode: the target count.
    # Turn/sequence modes have fractional weights: pre-compute the global W = sum(loss_weight) and
    # N = targets over the step (one all-reduce over DP x CP before the schedule), return
    # (loss * N / W, local target count) so Megatron's division by N yields sum(w*l) / W.

CPU: fp32 OptimizerConfig (clip_grad works), no distributed optimizer, no overlap_grad_reduce.
"""
